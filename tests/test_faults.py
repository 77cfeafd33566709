"""Faults: a killed pre-training resumes, a corrupted checkpoint is skipped, a NaN loss stops cleanly."""
import glob
import os
import signal
import time

import pytest

from tests import scriptrun
from utils import training

pytestmark = pytest.mark.slow

ARGS = scriptrun.TINY + ["--config.pretrain.epochs=3", "--config.run.checkpoint_every=3",
                         "--config.run.keep_checkpoints=10"]


def checkpoint_steps(workdir):
  paths = glob.glob(os.path.join(workdir, "checkpoints", "ckpt-*.index"))
  return sorted(int(os.path.basename(p)[5:-6]) for p in paths)


def test_kill_then_rerun_resumes_and_finishes(tmp_path):
  workdir = str(tmp_path / "run")
  process = scriptrun.start("paws_train.py", *ARGS, f"--workdir={workdir}", log_path=str(tmp_path / "first.log"))
  deadline = time.time() + 300
  while time.time() < deadline and not [s for s in checkpoint_steps(workdir) if s >= 6]:
    assert process.poll() is None, open(tmp_path / "first.log").read()[-2000:]
    time.sleep(0.2)
  process.send_signal(signal.SIGKILL)
  process.wait()
  saved = max(checkpoint_steps(workdir))
  assert 6 <= saved < 30
  rerun = scriptrun.run("paws_train.py", *ARGS, f"--workdir={workdir}")
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"at step {saved}" in rerun.stdout
  steps = [r["step"] for r in training.read_log(os.path.join(workdir, "pretrain_log.jsonl"), "step")]
  assert steps[-1] == 30 and steps[steps.index(saved) + 1:] == list(range(saved + 1, 31))
  evaluation = scriptrun.run("nn_eval.py", *ARGS, f"--workdir={workdir}")
  assert evaluation.returncode == 0, evaluation.stderr[-3000:]


def test_corrupted_newest_checkpoint_falls_back_with_warning(tmp_path):
  workdir = str(tmp_path / "run")
  short = ARGS + ["--config.pretrain.epochs=1"]
  assert scriptrun.run("paws_train.py", *short, f"--workdir={workdir}").returncode == 0
  steps = checkpoint_steps(workdir)
  newest = glob.glob(os.path.join(workdir, "checkpoints", f"ckpt-{steps[-1]}.data-*"))[0]
  with open(newest, "r+b") as f:
    f.truncate(os.path.getsize(newest) // 2)
  rerun = scriptrun.run("paws_train.py", *short, f"--workdir={workdir}")
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"ckpt-{steps[-1]}" in rerun.stdout and "unreadable" in rerun.stdout
  assert f"at step {steps[-2]}" in rerun.stdout


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  result = scriptrun.run("paws_train.py", *ARGS, "--config.pretrain.lr=1e30",
                         "--config.pretrain.start_lr=1e30", f"--workdir={workdir}")
  assert result.returncode == 2
  line = scriptrun.error_line(result)
  assert "non-finite at step" in line
  assert not os.path.exists(os.path.join(workdir, "encoder"))
