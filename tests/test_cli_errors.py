"""Bad input through the command line: exit status 2, one 'error:' line, nothing in the workdir touched."""
import os
import re

import pytest

from tests import fake_cifar
from tests import scriptrun

ROOT_README = os.path.join(scriptrun.ROOT, "README.md")
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
  line = scriptrun.fails_cleanly("paws_train.py", *CIFAR, f"--data_dir={tmp_path}/absent", error="data_dir_missing",
                       workdir=workdir)
  assert "does not exist" in line and "omit --data_dir" in line


def test_data_dir_empty(tmp_path, workdir):
  (tmp_path / "empty").mkdir()
  scriptrun.fails_cleanly("paws_train.py", *CIFAR, f"--data_dir={tmp_path}/empty", error="data_dir_empty", workdir=workdir)


@pytest.mark.parametrize("damage", ["truncated", "tampered"])
def test_bad_archive_is_never_unpickled(damage, tmp_path, workdir):
  marker = tmp_path / "marker"
  archive, _ = fake_cifar.make_archive(str(tmp_path), malicious_marker=str(marker))
  if damage == "truncated":
    truncate(archive)
  line = scriptrun.fails_cleanly("paws_train.py", *CIFAR, f"--data_dir={os.path.dirname(archive)}",
                       error="archive_checksum", workdir=workdir)
  assert archive in line
  assert not marker.exists()


def test_extracted_batch_truncated(tmp_path, workdir):
  folder = fake_cifar.make_folder(str(tmp_path))
  truncate(os.path.join(folder, "data_batch_2"))
  line = scriptrun.fails_cleanly("paws_train.py", *CIFAR, f"--data_dir={tmp_path}", error="batch_unreadable",
                       workdir=workdir)
  assert "data_batch_2" in line


def test_extracted_batch_missing(tmp_path, workdir):
  fake_cifar.make_folder(str(tmp_path), skip=("data_batch_4",))
  line = scriptrun.fails_cleanly("paws_train.py", *CIFAR, f"--data_dir={tmp_path}", error="batch_missing", workdir=workdir)
  assert "data_batch_4" in line


def test_extracted_batch_with_code_is_refused(tmp_path, workdir):
  marker = tmp_path / "marker"
  fake_cifar.make_folder(str(tmp_path), malicious_marker=str(marker))
  scriptrun.fails_cleanly("paws_train.py", *CIFAR, f"--data_dir={tmp_path}", error="pickle_global", workdir=workdir)
  assert not marker.exists()


def test_offline_folder_is_read_by_the_script(tmp_path, workdir):
  # The fake folder holds 20 training images: loading succeeds and the batch-size check speaks next.
  fake_cifar.make_folder(str(tmp_path))
  line = scriptrun.fails_cleanly("paws_train.py", *CIFAR, f"--data_dir={tmp_path}", error="batch_too_large",
                       workdir=workdir)
  assert "20 training images" in line


# --- --split_file ------------------------------------------------------------------

DIGITS_TRAIN = 1347


def digits_split(tmp_path, lines):
  path = tmp_path / "spc.split.txt"
  path.write_text("".join(f"{line}\n" for line in lines))
  return str(path)


def balanced_indices():
  """A valid digits split (4 per class) and the digits training labels."""
  from utils import datasets  # imported here: most tests in this module need no TensorFlow in-process
  labels = datasets.load_digits()[1]
  return [int(i) for i in datasets.select_labeled_indices(labels, 4, seed=7)], labels


@pytest.mark.parametrize("edit,error", [
    (lambda ix: ix[:-1] + ["seven"], "split_not_integer"),
    (lambda ix: ix[:-1] + [DIGITS_TRAIN], "split_out_of_range"),
    (lambda ix: ix[:-1] + [ix[0]], "split_duplicate"),
    (lambda ix: ix[:-1], "split_count"),
])
def test_bad_split_file(edit, error, tmp_path, workdir):
  indices, _ = balanced_indices()
  scriptrun.fails_cleanly("paws_train.py", f"--split_file={digits_split(tmp_path, edit(indices))}", error=error,
                workdir=workdir)


def test_unbalanced_split_file(tmp_path, workdir):
  indices, labels = balanced_indices()
  spare_zeros = [i for i in range(DIGITS_TRAIN) if labels[i] == 0 and i not in indices][:4]
  unbalanced = [i for i in indices if labels[i] != 1] + spare_zeros  # 40 indices: eight 0s, no 1
  line = scriptrun.fails_cleanly("paws_train.py", f"--split_file={digits_split(tmp_path, unbalanced)}",
                       error="split_unbalanced", workdir=workdir)
  assert "0: 8, 1: 0" in line


def test_split_file_missing(tmp_path, workdir):
  line = scriptrun.fails_cleanly("paws_train.py", f"--split_file={tmp_path}/nope.txt", error="split_missing",
                       workdir=workdir)
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


@pytest.mark.parametrize("override", ["--config.run.precision=float64", "--config.run.distribution=tpu",
                                      "--config.run.jit_compile=maybe"])
def test_bad_run_settings(override, workdir):
  line = scriptrun.fails_cleanly("paws_train.py", override, error="run_setting", workdir=workdir)
  assert override.split("=")[0].removeprefix("--config.") in line


# --- The README's catalogue ------------------------------------------------------------


def test_readme_troubleshooting_lists_every_error():
  with open(ROOT_README) as f:
    readme = f.read()
  section = readme[readme.index("## Troubleshooting"):]
  section = section[:section.index("\n## ", 1)] if "\n## " in section[1:] else section
  rows = [line for line in section.splitlines() if line.startswith("| `")]
  missing = [phrase for phrase in scriptrun.ERRORS.values()
             if not any(phrase in re.sub(r"`", "", row) for row in rows)]
  assert not missing, f"README troubleshooting lacks: {missing}"
