r"""A whole digits run with its workdir on a non-local file system, in ONE process (for tests/test_gfile.py).

  python -m tests.gfile_run LOCAL_DIR WORKDIR CRASH_AT_STEP SCRIPT_FLAGS...      (from the repository root)

LOCAL_DIR is an empty local folder: the run's current directory once started (the modules, entry scripts
included, still import from the repository root, which `python -m` recorded as an absolute path); the
summary lists what the run left in it. WORKDIR is a ram:// path: TensorFlow's in-memory file system,
which lives inside one process, so the three scripts' main functions run here one after the other, each
under cli.run_script with its own command line, as from a shell: paws_train.py stopped by an exception
once CRASH_AT_STEP steps are done (a crash, after the last cadence checkpoint), paws_train.py again
(resumes), fine_tune.py, nn_eval.py.

The scripts define absl flags of the same names (--workdir, --config, ...) when imported: each one's
flags are deleted from absl's registry after its last run, before the next script is imported.
The last stdout line is `SUMMARY {json}`: what the workdir holds, read back through tf.io.gfile.
"""

import importlib
import json
import os
import sys

from absl import flags
import tensorflow as tf

from utils import cli
from utils.train import loop as train_loop


class Crash(RuntimeError):
  """Stands for a crash (power loss, OOM kill) in the middle of pre-training."""


def crash_after(crash_at_step):
  """A training.run_loop that raises Crash once the state reaches crash_at_step (nothing saved at that point)."""
  original = train_loop.run_loop

  def run_loop(train_steps, iterator, state, loop, *args, **kwargs):
    def steps_then_crash(iterator, num_steps):
      if int(state.step.numpy()) >= crash_at_step:
        raise Crash(f"simulated crash at step {crash_at_step}")
      return train_steps(iterator, num_steps)

    return original(steps_then_crash, iterator, state, loop, *args, **kwargs)

  return run_loop


def run(module, argv):
  """cli.run_script(module.main) with sys.argv = argv, as `python SCRIPT argv...` would; returns the exit code.

  ml_collections defines a flag per --config.FIELD override while parsing: those are deleted afterwards,
  so the next parse of the same overrides does not define them twice.
  """
  sys.argv = list(argv)
  before = set(flags.FLAGS)
  try:
    cli.run_script(module.main)
  except SystemExit as done:  # absl's app.run ends with sys.exit(main(argv))
    return done.code or 0
  finally:
    forget_flags(set(flags.FLAGS) - before)
  return 0


def import_script(name, argv):
  """Imports an entry script (it defines its flags, --config from sys.argv); returns (module, its flag names)."""
  sys.argv = list(argv)
  before = set(flags.FLAGS)
  module = importlib.import_module(name)
  return module, set(flags.FLAGS) - before


def forget_flags(names):
  for name in names:
    delattr(flags.FLAGS, name)


def files_under(directory):
  """Relative paths of every file under a tf.io.gfile directory."""
  found = []
  for folder, _, names in tf.io.gfile.walk(directory):
    found += [os.path.relpath(os.path.join(folder, name), directory) for name in names]
  return sorted(found)


def summary(workdir):
  def read_json(name):
    with tf.io.gfile.GFile(os.path.join(workdir, name)) as f:
      return json.load(f)

  def is_png(name):
    with tf.io.gfile.GFile(os.path.join(workdir, name), "rb") as f:
      return f.read(8) == b"\x89PNG\r\n\x1a\n"

  pretrain_log = os.path.join(workdir, "pretrain_log.jsonl")
  finetune_log = os.path.join(workdir, "finetuned", "finetune_log.jsonl")
  return {
    "files": files_under(workdir),
    "pretrain_steps": [(r["step"], r["loss"]) for r in train_loop.read_log(pretrain_log, "step")],
    "finetune_steps": [r["step"] for r in train_loop.read_log(finetune_log, "step")],
    "eval": read_json("eval.json"),
    "encoder": read_json("encoder/encoder.json"),
    "pngs": {
      name: is_png(name)
      for name in ("pretrain_loss.png", "finetuned/finetune_loss.png", "confusion_matrix.png", "pca_projection.png")
    },
    "local_files": sorted(os.listdir(os.getcwd())),
  }


def main():
  local_dir, workdir, crash_at_step, *script_flags = sys.argv[1:]
  os.chdir(local_dir)
  common = [*script_flags, f"--workdir={workdir}"]
  codes = {}

  paws_train, names = import_script("paws_train", ["paws_train.py", *common])
  train_loop.run_loop, original = crash_after(int(crash_at_step)), train_loop.run_loop
  try:
    run(paws_train, ["paws_train.py", *common])
    codes["pretrain_crashed"] = "no crash"
  except Crash as crash:
    codes["pretrain_crashed"] = str(crash)
  finally:
    train_loop.run_loop = original
  codes["pretrain_resumed"] = run(paws_train, ["paws_train.py", *common])
  forget_flags(names)

  for name in ("fine_tune", "nn_eval"):
    module, names = import_script(name, [f"{name}.py", *common])
    codes[name] = run(module, [f"{name}.py", *common])
    forget_flags(names)

  print("SUMMARY " + json.dumps(dict(summary(workdir), codes=codes)))


if __name__ == "__main__":
  main()
