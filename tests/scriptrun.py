"""Runs the entry scripts as a user would, in subprocesses, with tiny digits settings."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A smoke-sized digits run: 10 steps per epoch, a WRN-10-1 with small heads, 4 labels per class (40).
TINY = [
  "--config=config.py:digits",
  "--config.data.labeled_per_class=4",
  "--config.pretrain.images_per_class=4",
  "--config.finetune.images_per_class=4",
  "--config.model.hidden_dim=32",
  "--config.model.projection_dim=32",
  "--config.pretrain.batch_size=128",
  "--config.pretrain.multicrop=2",
  "--config.pretrain.epochs=2",
  "--config.pretrain.warmup_epochs=1",
  "--config.finetune.epochs=3",
  "--config.run.log_every=1",
]


def environment():
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
  env.pop("TF_CONFIG", None)
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the scripts choose it, as for a user (utils/native_logs.py)
  return env


def command(script):
  """The command line that starts `script` from the repo root: an entry script by file name ("paws_train.py"),
  a helper module of tests/ by module name ("tests.kill_at_checkpoint": `python -m`, so it imports utils)."""
  if script.endswith(".py"):
    return [sys.executable, os.path.join(ROOT, script)]
  return [sys.executable, "-m", script]


def run(script, *args, timeout=600):
  """Runs `python script args...` (see command) from the repo root; returns the CompletedProcess."""
  return subprocess.run(
    [*command(script), *args],
    cwd=ROOT,
    env=environment(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def start(script, *args, log_path, extra_env=None):
  """Starts a script (see command) in the background, output to log_path; returns the Popen."""
  log = open(log_path, "w")  # noqa: SIM115 (the child process writes to it after we return)
  return subprocess.Popen(
    [*command(script), *args],
    cwd=ROOT,
    env=dict(environment(), **(extra_env or {})),
    stdout=log,
    stderr=subprocess.STDOUT,
  )


def read_text(path):
  """The whole text of a file (a background script's log, say)."""
  with open(path) as f:
    return f.read()


def error_line(result):
  """The one 'error: ...' line a failed run must end with."""
  lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  return lines[0]


# The phrase each user error carries; docs/troubleshooting.md must list every one (tests/test_docs.py).
ERRORS = {
  "no_workdir": "--workdir is required",
  "unwritable_workdir": "is not writable",
  "changed_config": "was written with other settings",
  "changed_labeled_subset": "holds another labeled subset",
  "data_dir_missing": "data directory",
  "data_dir_empty": "holds neither",
  "archive_checksum": "checksum does not match the official archive",
  "batch_unreadable": "cannot read this CIFAR-10 batch",
  "batch_missing": "is missing; re-extract",
  "pickle_global": "refused to unpickle global",
  "split_missing": "split file",
  "split_not_integer": "is not an integer",
  "split_out_of_range": "is outside",
  "split_duplicate": "repeats line",
  "split_count": "are expected",
  "split_unbalanced": "classes are unbalanced",
  "batch_too_large": "is larger than the",
  "too_many_classes": "classes; lower it",
  "too_few_labels": "labeled images per class but data.labeled_per_class=",
  "replicas": "must divide by the",
  "non_finite": "loss became non-finite at step",
  "no_pretraining": "run paws_train.py with this --workdir first",
  "no_encoder": "no trained encoder there",
  "model_config": "was trained with another model config",
  "run_setting": "must be one of",
  "out_of_range": "is out of range: must be",
  "not_allowed": "is not allowed: must be",
  "unknown_field": "has no field",
  "bad_flag_value": "invalid value --",
  "unknown_preset": "unknown preset",
  "unknown_flag": "unknown command line flag",
  "flag_order": "before a value for --config",
  "config_file": "cannot load the config file",
  "workdir_in_use": "is in use by",
  "download": "could not download CIFAR-10",
  "streamed_needs_data_dir": "needs --data_dir",
  "no_train_folder": "data.dataset=folder reads",
  "no_class_folders": "has no class folders",
  "empty_class_folder": "holds no .jpg",
  "unknown_class": "is not a class of",
  "no_val_folder": "evaluation needs labeled images",
  "unreadable_image": "cannot decode",
  "split_unknown_name": "names no training image",
  "split_ambiguous": "is ambiguous",
  "no_tfrecords": "no TFRecord files match",
  "tfrecord_empty": "hold no records",
  "tfrecord_unreadable": "is not an uncompressed TFRecord file",
  "tfrecord_keys": "the records must be tf.train.Example",
  "unknown_val_label": "which no training record has",
  "no_val_records": "no validation records",
  "tfds_not_prepared": "is not prepared in",
  "data_changed": "no longer matches the training images",
  "interrupted": "received: stopped at step",
  "checkpoint_write": "cannot write a checkpoint to",
  "worker_lost": "of the cluster (it stopped answering",
  "export_is_file": "is a file; give a new or empty folder",
  "export_not_empty": "is a non-empty folder without a SavedModel",
}


def snapshot(directory):
  """{relative path: bytes} of every file under directory."""
  files = {}
  for folder, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, directory)] = f.read()
  return files


def fails_cleanly(script, *args, error, workdir):
  """Runs the script; checks exit 2, the catalogued phrase, and an untouched workdir. Returns the line."""
  before = snapshot(workdir)
  result = run(script, *args, f"--workdir={workdir}")
  assert result.returncode == 2, result.stderr[-2000:]
  line = error_line(result)
  assert ERRORS[error] in line
  assert snapshot(workdir) == before
  return line


def config_with(*overrides):
  """The digits preset with `--config.a.b=value` overrides applied, as the scripts would see it."""
  import config as presets  # the repository's config.py

  config = presets.get_config("digits")
  for override in overrides:
    if override.startswith("--config."):
      path, value = override[len("--config.") :].split("=", 1)
      *sections, field = path.split(".")
      target = config
      for section in sections:
        target = getattr(target, section)
      setattr(target, field, type(getattr(target, field))(value))
  return config
