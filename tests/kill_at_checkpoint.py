"""Runs an entry script and SIGKILLs it at a chosen moment of its Nth checkpoint save (or encoder save).

  python -m tests.kill_at_checkpoint MOMENT N SCRIPT [ARGS...]      (from the repository root)

MOMENT 'after': right after the Nth CheckpointManager.save returned.
MOMENT 'during': inside it, once the variables are written to the checkpoint's
temporary folder but before they are merged into its final files and recorded,
which is what a preemption in the middle of a checkpoint write leaves.
MOMENT 'encoder': as the Nth encoder_lib.save_encoder call starts, after the last step (a worker of a
cluster preempted while the workers save their encoders).
SCRIPT is an entry script (paws_train.py, fine_tune.py): run from the repository root, its imports of
config and utils resolve there.
"""

import os
import runpy
import signal
import sys

import tensorflow as tf
from tensorflow.python.ops import gen_io_ops

from utils.model import encoder as encoder_lib


def main():
  moment, target, script = sys.argv[1], int(sys.argv[2]), sys.argv[3]
  if moment not in ("after", "during", "encoder"):
    raise SystemExit(f"MOMENT must be 'after', 'during' or 'encoder', got {moment!r}")
  saves = {"count": 0, "inside_target": False}
  kill = lambda: os.kill(os.getpid(), signal.SIGKILL)
  original_save = tf.train.CheckpointManager.save
  original_merge = gen_io_ops.merge_v2_checkpoints

  def save(self, *args, **kwargs):
    saves["count"] += 1
    saves["inside_target"] = saves["count"] == target
    path = original_save(self, *args, **kwargs)
    if saves["inside_target"] and moment == "after":
      print(f"killed after writing {path}", flush=True)
      kill()
    return path

  def merge(*args, **kwargs):
    if saves["inside_target"] and moment == "during":
      print("killed during a checkpoint write", flush=True)
      kill()
    return original_merge(*args, **kwargs)

  encoder_saves = {"count": 0}
  original_save_encoder = encoder_lib.save_encoder

  def save_encoder(*args, **kwargs):
    encoder_saves["count"] += 1
    if encoder_saves["count"] == target and moment == "encoder":
      print("killed as the encoder save starts", flush=True)
      kill()
    return original_save_encoder(*args, **kwargs)

  tf.train.CheckpointManager.save = save
  gen_io_ops.merge_v2_checkpoints = merge
  encoder_lib.save_encoder = save_encoder
  sys.argv = [script] + sys.argv[4:]
  runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
  main()
