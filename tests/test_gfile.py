"""Run outputs through tf.io.gfile: a workdir (and a CIFAR-10 --data_dir) on a non-local file system.

TensorFlow's in-memory file system (ram://) stands for gs://: same code path (no local path, no flock),
no network. It lives inside one process, so the whole-run test drives the three scripts' main functions
in one subprocess (tests/gfile_run.py); the others run in this process.
"""

import io
import json
import os
import subprocess
import sys
import uuid

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from tests import fake_cifar, scriptrun
from utils import fileio, plots
from utils import workdir as workdir_lib
from utils.data import datasets, splits
from utils.errors import UserError
from utils.train import loop as train_loop
from utils.workdir import Workdir


@pytest.fixture
def ram_dir():
  return f"ram://test_gfile/{uuid.uuid4().hex}"


def read_bytes(path):
  with tf.io.gfile.GFile(path, "rb") as f:
    return f.read()


def copy_tree(source, destination):
  """Copies a local folder to a tf.io.gfile folder."""
  for folder, _, names in os.walk(source):
    relative = os.path.relpath(folder, source)
    target = destination if relative == "." else f"{destination}/{relative}"  # ram:// keeps "/./" in names
    tf.io.gfile.makedirs(target)
    for name in names:
      tf.io.gfile.copy(os.path.join(folder, name), os.path.join(target, name))


@pytest.mark.slow  # ~40 s of CPU: two pre-training runs, fine-tuning and evaluation, each traced afresh
def test_full_digits_run_in_a_ram_workdir_crashes_resumes_and_writes_nothing_locally(tmp_path):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  workdir = f"ram://digits_{uuid.uuid4().hex}"
  script_flags = [f"--config={scriptrun.ROOT}/config.py:digits", *scriptrun.TINY[1:], "--config.run.checkpoint_every=4"]
  result = subprocess.run(
    [sys.executable, "-m", "tests.gfile_run", str(cwd), workdir, "14", *script_flags],
    cwd=scriptrun.ROOT,
    env=scriptrun.environment(),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1].removeprefix("SUMMARY "))
  assert summary["codes"] == {
    "pretrain_crashed": "simulated crash at step 14",
    "pretrain_resumed": 0,
    "fine_tune": 0,
    "nn_eval": 0,
  }
  # Resumed from the last cadence checkpoint before the crash (every 4 steps, epoch end at 10).
  assert f"resuming from {workdir}/checkpoints/ckpt-12 at step 12" in result.stdout
  steps = [step for step, _ in summary["pretrain_steps"]]
  assert steps == list(range(1, 15)) + list(range(13, 21))  # the log is appended to, not rewritten
  losses = dict(summary["pretrain_steps"][:14])
  for step, loss in summary["pretrain_steps"][14:16]:  # recomputed from the restored state and stream
    assert loss == pytest.approx(losses[step], abs=1e-4)
  assert summary["finetune_steps"] == [1, 2, 3]
  assert (summary["encoder"]["stage"], summary["encoder"]["step"]) == ("pretrain", 20)
  assert summary["eval"]["encoder"] == "finetuned" and summary["eval"]["num_support"] == 40
  assert summary["eval"]["checkpoint"] == f"{workdir}/finetuned/weights"
  assert all(summary["pngs"].values()), summary["pngs"]
  files = set(summary["files"])
  for name in (
    "config.json",
    "labeled_indices.npy",
    "labeled_indices.txt",
    "checkpoints/checkpoint",
    "checkpoints/ckpt-20.index",
    "pretrain_log.jsonl",
    "encoder/encoder.json",
    "encoder/weights.index",
    "finetuned/config.json",
    "finetuned/checkpoints/ckpt-3.index",
    "finetuned/encoder.json",
    "finetuned/weights.index",
    "eval.json",
  ):
    assert name in files, sorted(files)
  assert any(name.startswith("tensorboard/pretrain/events.out.tfevents") for name in files)
  assert any(name.startswith("finetuned/tensorboard/finetune/events.out.tfevents") for name in files)
  assert not any(name.endswith((".tmp", ".lock")) or ".write_test" in name for name in files)
  assert summary["local_files"] == [] and list(cwd.iterdir()) == []
  # One warning for the whole process: the nested finetuned/ folder and the reruns are covered by it.
  assert result.stderr.count("cannot be locked") == 1


def test_write_file_replaces_the_whole_file(ram_dir):
  # ram:// appends in "w" mode: the temp file + rename must still leave exactly the new contents.
  path = f"{ram_dir}/a.json"
  tf.io.gfile.makedirs(ram_dir)
  fileio.write_json(path, {"long": list(range(50))})
  with tf.io.gfile.GFile(path + ".tmp", "w") as f:  # a temp file left by a crash
    f.write("stale")
  fileio.write_json(path, {"short": 1})
  assert fileio.read_json(path, "test") == {"short": 1}
  fileio.write_file(f"{ram_dir}/b.bin", b"0123456789")
  fileio.write_file(f"{ram_dir}/b.bin", b"ab")
  assert read_bytes(f"{ram_dir}/b.bin") == b"ab"
  assert sorted(tf.io.gfile.listdir(ram_dir)) == ["a.json", "b.bin"]
  with pytest.raises(UserError, match="not found: no such run"):
    fileio.read_json(f"{ram_dir}/missing.json", "no such run")


def test_check_config_on_a_ram_workdir_saves_then_refuses_other_settings(ram_dir):
  config = scriptrun.config_with()
  workdir = workdir_lib.prepare_workdir(ram_dir)
  assert tf.io.gfile.isdir(workdir) and tf.io.gfile.listdir(workdir) == []  # the write probe is gone
  path = f"{workdir}/config.json"
  saved = workdir_lib.check_config(config, path, ("pretrain",))
  assert fileio.read_json(path, "test") == saved
  workdir_lib.check_config(config, path, ("pretrain",))  # same settings: accepted
  with pytest.raises(UserError, match=r"was written with other settings \(pretrain.tau\)"):
    workdir_lib.check_config(scriptrun.config_with("--config.pretrain.tau=0.2"), path, ("pretrain",))
  workdir_lib.check_config(scriptrun.config_with("--config.pretrain.tau=0.2"), path, ("pretrain",), force=True)
  assert fileio.read_json(path, "test")["pretrain"]["tau"] == 0.2


def test_non_local_workdir_runs_unlocked_with_one_warning_and_file_urls_are_locked(ram_dir, tmp_path, capsys):
  assert workdir_lib.lock_workdir(ram_dir) is None
  assert workdir_lib.lock_workdir(ram_dir + "/") is None
  assert workdir_lib.lock_workdir(f"{ram_dir}/finetuned") is None
  warnings = [line for line in capsys.readouterr().err.splitlines() if "cannot be locked" in line]
  assert warnings == [
    f"warning: workdir {ram_dir} is not on a local file system and cannot be locked; make sure no other run uses it"
  ]
  assert not tf.io.gfile.exists(f"{ram_dir}/{workdir_lib.LOCK_FILE}")
  handle = workdir_lib.lock_workdir(f"file://{tmp_path}")  # a local path under a file:// URL: flock as usual
  assert handle is not None
  with open(tmp_path / workdir_lib.LOCK_FILE) as f:
    assert json.load(f)["pid"] == os.getpid()
  assert workdir_lib.lock_workdir(str(tmp_path)) is handle


def test_split_files_round_trip_on_ram(ram_dir):
  indices = np.array([9, 3, 1200, 0, 41], dtype=np.int64)
  run = Workdir(f"{ram_dir}/run")
  splits.write_split_files(run.labeled_indices_npy, run.labeled_indices, indices[:2])
  npy_path, txt_path = splits.write_split_files(run.labeled_indices_npy, run.labeled_indices, indices)  # replaces
  assert np.array_equal(np.load(io.BytesIO(read_bytes(npy_path))), np.sort(indices))
  assert read_bytes(txt_path).decode() == "0\n3\n9\n41\n1200\n"
  assert np.array_equal(splits.read_split_file(txt_path, 1300, expected_count=5), np.sort(indices))
  with pytest.raises(UserError, match="does not exist"):
    splits.read_split_file(f"{ram_dir}/run", 1300)  # a folder, not a file


def test_metrics_log_appends_across_runs_on_ram(ram_dir):
  for first_step in (1, 3):  # a run, then its resumption
    log = train_loop.MetricsLog(ram_dir, "pretrain")
    for step in (first_step, first_step + 1):
      log.write({"kind": "step", "step": step, "epoch": 1, "loss": float(step)}, step)
    log.close()
  assert [r["step"] for r in train_loop.read_log(log.path, "step")] == [1, 2, 3, 4]
  assert tf.io.gfile.listdir(f"{ram_dir}/tensorboard/pretrain")  # event files written there too


def test_plots_write_pngs_on_ram(ram_dir):
  tf.io.gfile.makedirs(ram_dir)
  path = plots.loss_curves(
    {"epoch": np.array([1, 2]), "loss": np.array([1.0, 0.5])}, f"{ram_dir}/l.png", ("loss",), "t"
  )
  plots.confusion_matrix(np.eye(3, dtype=np.int64), f"{ram_dir}/c.png", "t")
  assert path == f"{ram_dir}/l.png"
  image = Image.open(io.BytesIO(read_bytes(path)))
  assert image.format == "PNG" and image.size == (720, 480)  # 6 x 4 inches at 120 dpi
  assert Image.open(io.BytesIO(read_bytes(f"{ram_dir}/c.png"))).size == (660, 600)


@pytest.mark.parametrize("layout", ["archive", "folder"])
def test_cifar10_data_dir_on_ram_matches_the_local_copy(tmp_path, ram_dir, layout):
  if layout == "archive":
    archive_path, md5 = fake_cifar.make_archive(str(tmp_path))
    local_dir = os.path.dirname(archive_path)
  else:
    fake_cifar.make_folder(str(tmp_path / "data"))
    local_dir, md5 = str(tmp_path / "data"), datasets.CIFAR10_MD5
  copy_tree(local_dir, ram_dir)
  local = datasets.load_cifar10(local_dir, expected_md5=md5)
  remote = datasets.load_cifar10(ram_dir, expected_md5=md5)
  assert len(local[0]) == 20 and len(local[2]) == 4
  for mine, theirs in zip(remote, local):
    assert np.array_equal(mine, theirs)
  if layout == "folder":  # the extracted folder named directly
    folder = datasets.load_cifar10(f"{ram_dir}/{datasets.CIFAR10_FOLDER}")
    assert all(np.array_equal(a, b) for a, b in zip(folder, local))
  with pytest.raises(UserError, match="data directory"):
    datasets.load_cifar10(f"{ram_dir}/missing")
