"""Faults: killed runs resume, corrupted checkpoints are skipped, a non-finite loss stops cleanly.

Every test runs the real scripts in subprocesses on tiny digits settings.
"""

import glob
import os
import shutil
import signal

import numpy as np
import pytest
import tensorflow as tf

from tests import scriptrun
from utils.model import encoder as encoder_lib
from utils.train import loop as train_loop

pytestmark = pytest.mark.slow

# 3 epochs of 10 steps; checkpoints at every multiple of 3 and at epoch ends: 3, 6, 9, 10, 12, 15, ...
ARGS = scriptrun.TINY + [
  "--config.pretrain.epochs=3",
  "--config.run.checkpoint_every=3",
  "--config.run.keep_checkpoints=20",
]
KILLER = "tests.kill_at_checkpoint"  # run as a module (scriptrun.command)


def checkpoint_steps(directory):
  paths = glob.glob(os.path.join(directory, "ckpt-*.index"))
  return sorted(int(os.path.basename(p)[5:-6]) for p in paths)


def logged_steps(path):
  return [r["step"] for r in train_loop.read_log(path, "step")]


def kill_at_checkpoint(moment, save_number, script, *args, workdir):
  """Runs script under the checkpoint killer; asserts it died by SIGKILL."""
  result = scriptrun.run(
    KILLER, moment, str(save_number), os.path.join(scriptrun.ROOT, script), *args, f"--workdir={workdir}"
  )
  assert result.returncode == -signal.SIGKILL, result.stdout[-2000:] + result.stderr[-2000:]
  return result


def assert_resumes_and_finishes(workdir, resumed_at, overlap_expected):
  """Reruns the same pre-training command: resumes at `resumed_at`, ends at step 30, and evaluates.

  Steps the killed run had already logged past its last checkpoint are computed again by the rerun from
  the restored weights, optimizer state and replayed batches: their losses must match (the killed run's
  records come first in the log, the rerun's last). Comparing with a separate uninterrupted run instead
  would need bit-identical runs end to end: rare float non-determinism, amplified over ten steps at
  these learning rates, once made such a comparison differ by 5 % at the first resumed step.
  """
  rerun = scriptrun.run("paws_train.py", *ARGS, f"--workdir={workdir}")
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"at step {resumed_at}" in rerun.stdout
  records = train_loop.read_log(os.path.join(workdir, "pretrain_log.jsonl"), "step")
  steps = [r["step"] for r in records]
  assert steps[-1] == 30
  # after the resume point the log continues step by step (steps logged past it before the kill repeat)
  resumed = len(steps) - 1 - steps[::-1].index(resumed_at + 1)
  assert steps[resumed:] == list(range(resumed_at + 1, 31))
  killed_run = {r["step"]: r["loss"] for r in records[:resumed] if r["step"] > resumed_at}
  assert bool(killed_run) == overlap_expected
  for record in records[resumed:]:
    if record["step"] in killed_run:
      assert record["loss"] == pytest.approx(killed_run[record["step"]], rel=1e-4, abs=1e-5), record["step"]
  evaluation = scriptrun.run("nn_eval.py", *ARGS, f"--workdir={workdir}", "--encoder=pretrained")
  assert evaluation.returncode == 0, evaluation.stderr[-3000:]
  assert "soft-NN top-1 (pretrained encoder" in evaluation.stdout


@pytest.mark.parametrize(
  "moment,resumed_at,overlap",
  [
    ("after", 12, False),  # killed right after ckpt-12 (the 5th save) was recorded
    ("during", 10, True),  # killed while ckpt-12 was being written (steps 11-12 logged): never a checkpoint
  ],
)
def test_kill_at_a_checkpoint_resumes_from_the_newest_complete_one(moment, resumed_at, overlap, tmp_path):
  workdir = str(tmp_path / "run")
  kill_at_checkpoint(moment, 5, "paws_train.py", *ARGS, workdir=workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  assert max(checkpoint_steps(checkpoints)) == resumed_at
  if moment == "during":
    assert os.path.isdir(os.path.join(checkpoints, "ckpt-12_temp"))  # the half-written one
  assert_resumes_and_finishes(workdir, resumed_at, overlap_expected=overlap)


def test_corrupted_newest_checkpoint_falls_back_with_warning(tmp_path):
  workdir = str(tmp_path / "run")
  short = ARGS + ["--config.pretrain.epochs=1"]
  assert scriptrun.run("paws_train.py", *short, f"--workdir={workdir}").returncode == 0
  steps = checkpoint_steps(os.path.join(workdir, "checkpoints"))
  newest = glob.glob(os.path.join(workdir, "checkpoints", f"ckpt-{steps[-1]}.data-*"))[0]
  with open(newest, "r+b") as f:
    f.truncate(os.path.getsize(newest) // 2)
  rerun = scriptrun.run("paws_train.py", *short, f"--workdir={workdir}")
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"ckpt-{steps[-1]}" in rerun.stdout and "unreadable" in rerun.stdout
  assert f"at step {steps[-2]}" in rerun.stdout


def test_non_finite_loss_stops_with_step_and_keeps_a_loadable_checkpoint(tmp_path):
  # Warm-up from a sane 0.8 towards 1e30 over 10 steps: finite at first, then the loss blows up.
  args = ARGS + ["--config.pretrain.lr=1e30", "--config.run.checkpoint_every=1"]
  workdir = str(tmp_path / "run")
  result = scriptrun.run("paws_train.py", *args, f"--workdir={workdir}")
  assert result.returncode == 2
  line = scriptrun.error_line(result)
  assert scriptrun.ERRORS["non_finite"] in line
  failed_at = int(line.split("at step ")[1].split()[0])
  checkpoints = os.path.join(workdir, "checkpoints")
  assert failed_at >= 2 and checkpoint_steps(checkpoints) == list(range(1, failed_at))
  assert not os.path.exists(os.path.join(workdir, "encoder"))
  config = scriptrun.config_with(*args)
  encoder = encoder_lib.build_encoder(config.model, config.data.image_size)
  tf.train.Checkpoint(encoder=encoder).restore(
    tf.train.latest_checkpoint(checkpoints)
  ).assert_existing_objects_matched()
  assert all(np.isfinite(w).all() for w in encoder.get_weights())


# --- fine_tune.py -------------------------------------------------------------

FINETUNE = ARGS + ["--config.pretrain.epochs=1", "--config.finetune.epochs=5"]  # 5 steps, a checkpoint each


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("pretrained") / "run")
  result = scriptrun.run("paws_train.py", *FINETUNE, f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def copy_of(pretrained, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(pretrained, workdir)
  return workdir


def finetune_and_check(workdir, resumed_at):
  rerun = scriptrun.run("fine_tune.py", *FINETUNE, f"--workdir={workdir}")
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"at step {resumed_at}" in rerun.stdout
  steps = logged_steps(os.path.join(workdir, "finetuned", "finetune_log.jsonl"))
  assert steps[-(5 - resumed_at) :] == list(range(resumed_at + 1, 6))
  evaluation = scriptrun.run("nn_eval.py", *FINETUNE, f"--workdir={workdir}")
  assert evaluation.returncode == 0, evaluation.stderr[-3000:]
  assert "soft-NN top-1 (finetuned encoder" in evaluation.stdout
  return rerun


@pytest.mark.parametrize("moment,resumed_at", [("after", 2), ("during", 1)])
def test_fine_tune_killed_at_a_checkpoint_resumes(moment, resumed_at, pretrained, tmp_path):
  workdir = copy_of(pretrained, tmp_path)
  kill_at_checkpoint(moment, 2, "fine_tune.py", *FINETUNE, workdir=workdir)
  assert max(checkpoint_steps(os.path.join(workdir, "finetuned", "checkpoints"))) == resumed_at
  finetune_and_check(workdir, resumed_at)


def test_fine_tune_corrupted_newest_checkpoint_falls_back_with_warning(pretrained, tmp_path):
  workdir = copy_of(pretrained, tmp_path)
  kill_at_checkpoint("after", 4, "fine_tune.py", *FINETUNE, workdir=workdir)
  newest = glob.glob(os.path.join(workdir, "finetuned", "checkpoints", "ckpt-4.data-*"))[0]
  with open(newest, "r+b") as f:
    f.write(b"\0" * os.path.getsize(newest))  # same size, zeroed: corrupted rather than truncated
  rerun = finetune_and_check(workdir, 3)
  assert "ckpt-4" in rerun.stdout and "unreadable" in rerun.stdout
