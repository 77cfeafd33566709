"""The step loop shared by pre-training and fine-tuning: checkpoints, logs, progress, NaN stop."""
import json
import math
import os
import time

import numpy as np
import tensorflow as tf
import tf_keras

from utils.errors import UserError


def restore_newest_intact(checkpoint, manager, log=print):
  """Restores the newest checkpoint that reads back completely.

  Restore order: the newest checkpoint in the workdir; if it is truncated or
  corrupted, the one before it (with a warning naming the file), and so on;
  with none usable, a fresh start. Returns the restored path or None.
  """
  for path in reversed(manager.checkpoints):
    try:
      checkpoint.restore(path).assert_existing_objects_matched()
      return path
    except (tf.errors.OpError, AssertionError, ValueError, IndexError, OSError) as error:
      reason = str(error).strip().splitlines()[0][:200]
      log(f"warning: checkpoint {path} is unreadable ({reason}); trying the previous one")
  if manager.checkpoints:
    log("warning: no readable checkpoint left; starting from scratch")
  return None


def checkpoint_and_restore(encoder, optimizer, step, directory, keep, log=print):
  """A CheckpointManager over (encoder, optimizer, step), restored from its newest intact checkpoint.

  Returns (checkpoint, manager, restored path or None).
  """
  checkpoint = tf.train.Checkpoint(encoder=encoder, optimizer=optimizer, step=step)
  manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=keep)
  return checkpoint, manager, restore_newest_intact(checkpoint, manager, log)


class MetricsLog:
  """Appends one JSON object per line (flushed, so a crash loses nothing) and mirrors scalars to TensorBoard."""

  def __init__(self, workdir, name):
    self.path = os.path.join(workdir, f"{name}_log.jsonl")
    self.file = open(self.path, "a")
    self.writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard", name))

  def write(self, record, step):
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()
    with self.writer.as_default():
      for key, value in record.items():
        if key not in ("step", "epoch", "kind"):
          tf.summary.scalar(f"{record['kind']}/{key}", value, step=step)

  def close(self):
    self.file.close()
    self.writer.close()


def read_log(path, kind):
  """The records of one kind ('step' or 'epoch') from a metrics log."""
  with open(path) as f:
    return [r for r in map(json.loads, f) if r.get("kind") == kind]


def run_loop(*, train_steps, iterator, step, checkpoint, manager, workdir, log_name,
             total_steps, steps_per_epoch, steps_per_loop, log_every, checkpoint_every,
             learning_rate, images_per_step, verbose=True):
  """Runs compiled steps until `step` reaches total_steps.

  Args:
    train_steps: tf.function(iterator, num_steps) running num_steps updates
      and returning a dict of float32 scalar metrics (including 'loss') of the
      last one.
    step: tf.Variable counting completed steps (saved in the checkpoint).
    learning_rate: callable step -> learning rate, for logging.
    images_per_step: images embedded per step, for throughput.
  Raises:
    UserError when the loss stops being finite; the last good checkpoint on
    disk is left as it was.
  """
  log = MetricsLog(workdir, log_name)
  current = int(step.numpy())
  try:
    while current < total_steps:
      epoch = current // steps_per_epoch
      epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
      progress = tf_keras.utils.Progbar(
          epoch_end - epoch * steps_per_epoch, stateful_metrics=["lr", "img/s"],
          verbose=1 if verbose else 0, unit_name="step")
      print(f"epoch {epoch + 1}/{math.ceil(total_steps / steps_per_epoch)}")
      epoch_sums, epoch_count = {}, 0
      while current < epoch_end:
        num_steps = min(steps_per_loop, epoch_end - current)
        start = time.perf_counter()
        metrics = {k: float(v) for k, v in train_steps(iterator, tf.constant(num_steps)).items()}
        elapsed = time.perf_counter() - start
        if not all(math.isfinite(v) for v in metrics.values()):
          raise UserError(
              f"loss became non-finite at step {current + num_steps} ({metrics}); stopped without "
              f"saving, the last good checkpoint in {manager.directory} is intact; lower the learning "
              "rate or check the inputs")
        step.assign_add(num_steps)
        current += num_steps
        metrics["lr"] = float(learning_rate(current - 1))
        for key, value in metrics.items():
          epoch_sums[key] = epoch_sums.get(key, 0.0) + value
        epoch_count += 1
        shown = dict(metrics)
        shown["img/s"] = images_per_step * num_steps / elapsed
        progress.update(current - epoch * steps_per_epoch, list(shown.items()))
        if current % log_every < num_steps or current == epoch_end:
          log.write({"kind": "step", "step": current, "epoch": epoch + 1, **shown}, current)
        if current % checkpoint_every < num_steps and current != epoch_end:
          manager.save(checkpoint_number=current)
      manager.save(checkpoint_number=current)
      log.write({"kind": "epoch", "step": current, "epoch": epoch + 1,
                 **{k: v / epoch_count for k, v in epoch_sums.items()}}, current)
  finally:
    log.close()
  return log.path


def epoch_means(path):
  """Per-epoch mean metrics from a metrics log, as a dict of numpy arrays."""
  records = read_log(path, "epoch")
  keys = records[0].keys() if records else []
  return {k: np.array([r[k] for r in records]) for k in keys}
