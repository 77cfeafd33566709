"""Bad input through the command line: exit status 2, one 'error:' line, nothing in the workdir touched."""

import glob
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests import fake_cifar, scriptrun
from utils.errors import UserError

CIFAR = ["--config=config.py:cifar10"]


@pytest.fixture
def workdir(tmp_path):
  """A workdir that already holds a file a failed run must leave alone."""
  path = tmp_path / "work"
  path.mkdir()
  (path / "notes.txt").write_text("earlier results")
  return str(path)


def truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


# --- --data_dir ------------------------------------------------------------------


def test_data_dir_missing(tmp_path, workdir):
  line = scriptrun.fails_cleanly(
    "paws_train.py", *CIFAR, f"--data_dir={tmp_path}/absent", error="data_dir_missing", workdir=workdir
  )
  assert "does not exist" in line and "omit --data_dir" in line


def test_data_dir_empty(tmp_path, workdir):
  (tmp_path / "empty").mkdir()
  scriptrun.fails_cleanly(
    "paws_train.py", *CIFAR, f"--data_dir={tmp_path}/empty", error="data_dir_empty", workdir=workdir
  )


@pytest.mark.parametrize("damage", ["truncated", "tampered"])
def test_bad_archive_is_never_unpickled(damage, tmp_path, workdir):
  marker = tmp_path / "marker"
  archive, _ = fake_cifar.make_archive(str(tmp_path), malicious_marker=str(marker))
  if damage == "truncated":
    truncate(archive)
  line = scriptrun.fails_cleanly(
    "paws_train.py", *CIFAR, f"--data_dir={os.path.dirname(archive)}", error="archive_checksum", workdir=workdir
  )
  assert archive in line
  assert not marker.exists()


def test_extracted_batch_truncated(tmp_path, workdir):
  folder = fake_cifar.make_folder(str(tmp_path))
  truncate(os.path.join(folder, "data_batch_2"))
  line = scriptrun.fails_cleanly(
    "paws_train.py", *CIFAR, f"--data_dir={tmp_path}", error="batch_unreadable", workdir=workdir
  )
  assert "data_batch_2" in line


def test_extracted_batch_missing(tmp_path, workdir):
  fake_cifar.make_folder(str(tmp_path), skip=("data_batch_4",))
  line = scriptrun.fails_cleanly(
    "paws_train.py", *CIFAR, f"--data_dir={tmp_path}", error="batch_missing", workdir=workdir
  )
  assert "data_batch_4" in line


def test_extracted_batch_with_code_is_refused(tmp_path, workdir):
  marker = tmp_path / "marker"
  fake_cifar.make_folder(str(tmp_path), malicious_marker=str(marker))
  scriptrun.fails_cleanly("paws_train.py", *CIFAR, f"--data_dir={tmp_path}", error="pickle_global", workdir=workdir)
  assert not marker.exists()


def test_offline_folder_is_read_by_the_script(tmp_path, workdir):
  # The fake folder holds 20 training images: loading succeeds and the batch-size check speaks next.
  fake_cifar.make_folder(str(tmp_path))
  line = scriptrun.fails_cleanly(
    "paws_train.py", *CIFAR, f"--data_dir={tmp_path}", error="batch_too_large", workdir=workdir
  )
  assert "20 training images" in line


# --- --split_file ------------------------------------------------------------------

DIGITS_TRAIN = 1347


def digits_split(tmp_path, lines):
  path = tmp_path / "spc.split.txt"
  path.write_text("".join(f"{line}\n" for line in lines))
  return str(path)


def balanced_indices():
  """A valid digits split (the preset's labels per class) and the digits training labels."""
  from utils.data import datasets, splits  # imported here: most tests in this module need no TensorFlow in-process

  labels = datasets.load_digits()[1]
  per_class = scriptrun.config_with().data.labeled_per_class
  return [int(i) for i in splits.select_labeled_indices(labels, per_class, seed=7)], labels


@pytest.mark.parametrize(
  "edit,error",
  [
    (lambda ix: ix[:-1] + ["seven"], "split_not_integer"),
    (lambda ix: ix[:-1] + [DIGITS_TRAIN], "split_out_of_range"),
    (lambda ix: ix[:-1] + [ix[0]], "split_duplicate"),
    (lambda ix: ix[:-1], "split_count"),
  ],
)
def test_bad_split_file(edit, error, tmp_path, workdir):
  indices, _ = balanced_indices()
  scriptrun.fails_cleanly(
    "paws_train.py", f"--split_file={digits_split(tmp_path, edit(indices))}", error=error, workdir=workdir
  )


def test_unbalanced_split_file(tmp_path, workdir):
  indices, labels = balanced_indices()
  per_class = len(indices) // 10
  spare_zeros = [i for i in range(DIGITS_TRAIN) if labels[i] == 0 and i not in indices][:per_class]
  unbalanced = [i for i in indices if labels[i] != 1] + spare_zeros  # the right count: twice the 0s, no 1
  line = scriptrun.fails_cleanly(
    "paws_train.py", f"--split_file={digits_split(tmp_path, unbalanced)}", error="split_unbalanced", workdir=workdir
  )
  assert f"0: {2 * per_class}, 1: 0" in line


def test_split_file_missing(tmp_path, workdir):
  line = scriptrun.fails_cleanly(
    "paws_train.py", f"--split_file={tmp_path}/nope.txt", error="split_missing", workdir=workdir
  )
  assert "does not exist" in line


# --- fine_tune.py / nn_eval.py without a pre-training run -----------------------------


def test_fine_tune_on_a_workdir_without_pretraining(workdir):
  scriptrun.fails_cleanly("fine_tune.py", error="no_pretraining", workdir=workdir)


def test_eval_on_a_workdir_without_encoder(workdir):
  scriptrun.fails_cleanly("nn_eval.py", error="no_encoder", workdir=workdir)


def test_eval_on_a_missing_workdir(tmp_path):
  result = scriptrun.run("nn_eval.py", f"--workdir={tmp_path}/absent")
  assert result.returncode == 2
  assert scriptrun.ERRORS["no_pretraining"] in scriptrun.error_line(result)
  assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize(
  "override", ["--config.run.precision=float64", "--config.run.distribution=tpu", "--config.run.jit_compile=maybe"]
)
def test_bad_run_settings(override, workdir):
  line = scriptrun.fails_cleanly("paws_train.py", override, error="run_setting", workdir=workdir)
  assert override.split("=")[0].removeprefix("--config.") in line


# --- CIFAR-10 download without network ------------------------------------------------------------

# Runs a script with utils.data.datasets.CIFAR10_DOWNLOAD_URL replaced by argv[1].
WITH_DOWNLOAD_URL = (
  "import runpy, sys\n"
  "from utils.data import datasets\n"
  "datasets.CIFAR10_DOWNLOAD_URL = sys.argv.pop(1)\n"
  "sys.argv.pop(0)\n"
  "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def test_download_failure_is_one_line_with_the_offline_remedy(tmp_path, workdir):
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{probe.getsockname()[1]}/cifar-10-python.tar.gz"  # closed once the probe is
  before = scriptrun.snapshot(workdir)
  result = subprocess.run(
    [sys.executable, "-c", WITH_DOWNLOAD_URL, url, "paws_train.py", *CIFAR, f"--workdir={workdir}"],
    cwd=scriptrun.ROOT,
    env=dict(scriptrun.environment(), KERAS_HOME=str(tmp_path / "keras")),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 2, result.stderr[-2000:]
  line = scriptrun.error_line(result)
  assert line.startswith(f"error: {scriptrun.ERRORS['download']} from {url} (connection refused)")
  assert "pass --data_dir=DIR" in line and "cifar-10-python.tar.gz" in line
  assert scriptrun.snapshot(workdir) == before
  assert os.listdir(tmp_path / "keras" / "datasets") == []  # nothing half-downloaded left to trust later


# --- One run per workdir ---------------------------------------------------------------------------

# Holds the lock of the workdir argv[1] (lock file argv[2]) as a run would, without TensorFlow.
LOCK_HOLDER = (
  "import fcntl, json, os, sys, time\n"
  "handle = open(os.path.join(sys.argv[1], sys.argv[2]), 'a+')\n"
  "fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
  "handle.truncate(0)\n"
  "json.dump({'pid': os.getpid(), 'host': 'elsewhere', 'command': 'paws_train.py --workdir=W'}, handle)\n"
  "handle.flush()\n"
  "print('locked', flush=True)\n"
  "time.sleep(120)\n"
)


def test_workdir_lock_names_its_holder_and_dies_with_it(tmp_path):
  from utils import workdir as workdir_lib  # imports TensorFlow; the rest of this module runs it in subprocesses only

  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = subprocess.Popen(
    [sys.executable, "-c", LOCK_HOLDER, str(workdir), workdir_lib.LOCK_FILE], stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(UserError) as error:
      workdir_lib.lock_workdir(str(workdir))
    assert str(error.value).startswith(
      f"workdir {workdir} is in use by process {holder.pid} on elsewhere (paws_train.py --workdir=W); "
    )
  finally:
    holder.kill()
    holder.wait()
  lock_path = workdir / workdir_lib.LOCK_FILE
  assert json.loads(lock_path.read_text())["pid"] == holder.pid  # the killed holder's file stays...
  handle = workdir_lib.lock_workdir(str(workdir))  # ...but its lock died with it
  mine = json.loads(lock_path.read_text())
  assert mine["pid"] == os.getpid() and mine["host"] == socket.gethostname()
  # Taken once per process; folders inside the workdir (fine_tune.py's finetuned/) are covered by it.
  assert workdir_lib.lock_workdir(str(workdir)) is handle
  (workdir / "finetuned").mkdir()
  assert workdir_lib.lock_workdir(str(workdir / "finetuned")) is handle
  assert not (workdir / "finetuned" / workdir_lib.LOCK_FILE).exists()
  other = subprocess.run(
    [sys.executable, "-c", LOCK_HOLDER, str(workdir), workdir_lib.LOCK_FILE], capture_output=True, text=True, timeout=60
  )
  assert other.returncode != 0 and "BlockingIOError" in other.stderr


def wait_for(condition, process, log_path, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    assert process.poll() is None, scriptrun.read_text(log_path)[-3000:]
    assert time.time() < deadline, scriptrun.read_text(log_path)[-3000:]
    time.sleep(0.2)


@pytest.mark.slow
def test_second_run_on_a_busy_workdir_is_refused_and_a_killed_run_does_not_block(tmp_path):
  workdir = str(tmp_path / "run")
  args = scriptrun.TINY + ["--config.pretrain.epochs=200", "--config.run.checkpoint_every=2", f"--workdir={workdir}"]
  first_log, third_log = str(tmp_path / "first.log"), str(tmp_path / "third.log")
  first = scriptrun.start("paws_train.py", *args, log_path=first_log)
  try:
    wait_for(lambda: glob.glob(os.path.join(workdir, "checkpoints", "ckpt-*.index")), first, first_log)
    second = scriptrun.run("paws_train.py", *args)
    assert second.returncode == 2, second.stderr[-2000:]
    line = scriptrun.error_line(second)
    assert f"{scriptrun.ERRORS['workdir_in_use']} process {first.pid} on {socket.gethostname()} (paws_train.py " in line
    assert first.poll() is None  # the first run goes on undisturbed
  finally:
    first.kill()  # SIGKILL: no exit handler runs, the lock file stays behind
    first.wait()
  with open(os.path.join(workdir, ".lock")) as f:
    assert json.load(f)["pid"] == first.pid
  third = scriptrun.start("paws_train.py", *args, log_path=third_log)
  try:
    wait_for(lambda: "resuming from" in scriptrun.read_text(third_log), third, third_log)
  finally:
    third.kill()
    third.wait()
