"""What pre-training and fine-tuning share around the step: the train state, checkpoints, the step loop.

The loop writes a JSON-lines log and TensorBoard scalars, shows a progress bar, checkpoints every
`run.checkpoint_every` steps and at every epoch end, stops on a non-finite loss, and on SIGTERM
(a cloud VM's preemption notice) or SIGINT (Ctrl-C) saves a checkpoint at the current step before
it exits, so re-running the same command resumes there.
"""

from collections.abc import Callable
import dataclasses
import errno
import json
import math
import os
import signal
import threading
import time

from absl import logging
from ml_collections import ConfigDict
import numpy as np
import tensorflow as tf
import tf_keras

from utils.errors import Interrupted, UserError
from utils.train import optim
from utils.workdir import Workdir


@dataclasses.dataclass
class TrainState:
  """Everything a checkpoint holds: the model (encoder or classifier), its optimizer with slots, the step counter."""

  model: tf_keras.Model
  optimizer: tf_keras.optimizers.legacy.Optimizer
  step: tf.Variable
  checkpoint: tf.train.Checkpoint = None
  manager: tf.train.CheckpointManager = None


def create_train_state(
  strategy: tf.distribute.Strategy,
  make_model: Callable[[], tf_keras.Model],
  make_optimizer: Callable[[], tf_keras.optimizers.legacy.Optimizer],
) -> TrainState:
  """Builds the model, its optimizer (slots created: optim.create_slots) and the step counter under `strategy`.

  Args:
    strategy: the tf.distribute strategy the step runs under.
    make_model: callable returning the built model (the encoder, or the classifier).
    make_optimizer: callable returning its optimizer (optim.build_lars or optim.build_sgd).
  Returns:
    TrainState without checkpoint (see `restore`).
  """
  with strategy.scope():
    model = make_model()
    optimizer = make_optimizer()
    optim.create_slots(optimizer, model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64, name="step")
  return TrainState(model, optimizer, step)


def restore(state: TrainState, directory: str, keep: int, log: Callable[[str], None] = print) -> str | None:
  """Attaches a CheckpointManager on `directory` to the state and restores its newest intact checkpoint.

  Restore order: the newest checkpoint in `directory`; if it is truncated or corrupted, the one before
  it (with a warning naming the file), and so on; with none usable, the state as built (fresh start or
  the pre-trained encoder). Returns the restored path or None.
  """
  # "encoder" names the model in every checkpoint written so far (the classifier's too): kept so they restore.
  state.checkpoint = tf.train.Checkpoint(encoder=state.model, optimizer=state.optimizer, step=state.step)
  state.manager = tf.train.CheckpointManager(state.checkpoint, directory, max_to_keep=keep)
  for path in reversed(state.manager.checkpoints):
    try:
      state.checkpoint.restore(path).assert_existing_objects_matched()
      return path
    except (tf.errors.OpError, AssertionError, ValueError, IndexError, OSError) as error:
      reason = str(error).strip().splitlines()[0][:200]
      log(f"warning: checkpoint {path} is unreadable ({reason}); trying the previous one")
  if state.manager.checkpoints:
    log("warning: no readable checkpoint left; starting from scratch")
  return None


def save(state: TrainState) -> str:
  """Writes a checkpoint numbered by the current step; a full disk or failed write is a one-line error."""
  try:
    return state.manager.save(checkpoint_number=int(state.step.numpy()))
  except (OSError, tf.errors.OpError) as error:
    reason = os.strerror(error.errno) if getattr(error, "errno", None) else str(error).strip().splitlines()[0][:200]
    previous = state.manager.latest_checkpoint or "none yet"
    space = " (free some disk space)" if getattr(error, "errno", None) == errno.ENOSPC else ""
    raise UserError(
      f"cannot write a checkpoint to {state.manager.directory}: {reason}{space}; the previous "
      f"checkpoint ({previous}) is intact: re-run the same command to resume from it"
    ) from None


@dataclasses.dataclass
class Loop:
  """The shape of one training run, for the step loop."""

  name: str  # 'pretrain' or 'finetune': names the log file and the TensorBoard folder
  total_steps: int
  steps_per_epoch: int
  images_per_step: int  # for the img/s column
  learning_rate: Callable[[int], float]  # step -> rate, for the log


class MetricsLog:
  """Appends one JSON object per line (flushed, so a crash loses nothing) and mirrors scalars to TensorBoard.

  Through tf.io.gfile, so the workdir may be gs://...; there a flush uploads the whole file again, which
  costs little at one line per `run.log_every` steps.
  """

  def __init__(self, workdir, name):
    self.path = Workdir(workdir).metrics_log(name)
    self.file = tf.io.gfile.GFile(self.path, "a")
    self.writer = tf.summary.create_file_writer(Workdir(workdir).tensorboard(name))

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


def read_log(path: str, kind: str) -> list[dict]:
  """The records of one kind ('step' or 'epoch') from a metrics log."""
  with tf.io.gfile.GFile(path) as f:
    return [r for r in map(json.loads, f) if r.get("kind") == kind]


class _StopSignals:
  """Records SIGTERM / SIGINT instead of dying, so the loop can save and exit between steps.

  A second signal of either kind falls back to the default behaviour (a second Ctrl-C kills at once).
  Outside the main thread (e.g. a notebook worker) signals cannot be caught and nothing is installed.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received = None
    self.previous = {}

  def _handle(self, number, frame):
    del frame
    self.received = number
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
    return self

  def __exit__(self, *exc):
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)


def run_loop(
  train_steps: Callable,
  iterator,
  state: TrainState,
  loop: Loop,
  run_config: ConfigDict,
  workdir: str | None,
  verbose: bool = True,
) -> str | None:
  """Runs compiled steps until state.step reaches loop.total_steps.

  Args:
    train_steps: tf.function(iterator, num_steps) running num_steps updates and returning a dict of
      float32 scalar metrics (including 'loss') of the last one.
    iterator: the input iterator, positioned at state.step.
    state: TrainState with a checkpoint manager (see `restore`).
    loop: Loop.
    run_config: the config's `run` section (steps_per_loop, log_every, checkpoint_every).
    workdir: where the log and TensorBoard files go (None: no log, as on a cluster's other workers).
  Returns:
    The path of the metrics log (None without a workdir).
  Raises:
    UserError when the loss stops being finite (the last good checkpoint on disk is left as it was);
    Interrupted after saving a checkpoint when SIGTERM or SIGINT arrived.
  """
  log = MetricsLog(workdir, loop.name) if workdir else None
  current = int(state.step.numpy())
  num_epochs = math.ceil(loop.total_steps / loop.steps_per_epoch)
  try:
    with _StopSignals() as signals:
      while current < loop.total_steps:
        epoch = current // loop.steps_per_epoch
        epoch_start = epoch * loop.steps_per_epoch
        epoch_end = min(epoch_start + loop.steps_per_epoch, loop.total_steps)
        progress = tf_keras.utils.Progbar(
          epoch_end - epoch_start, stateful_metrics=["lr", "img/s"], verbose=1 if verbose else 0, unit_name="step"
        )
        logging.info(f"epoch {epoch + 1}/{num_epochs}")
        epoch_sums, epoch_count = {}, 0
        while current < epoch_end:
          num_steps = min(run_config.steps_per_loop, epoch_end - current)
          start = time.perf_counter()
          metrics = {k: float(v) for k, v in train_steps(iterator, tf.constant(num_steps)).items()}
          elapsed = time.perf_counter() - start
          if not all(math.isfinite(v) for v in metrics.values()):
            raise UserError(
              f"loss became non-finite at step {current + num_steps} ({metrics}); stopped without "
              f"saving, the last good checkpoint in {state.manager.directory} is intact; lower the learning "
              "rate or check the inputs"
            )
          state.step.assign_add(num_steps)
          current += num_steps
          metrics["lr"] = float(loop.learning_rate(current - 1))
          for key, value in metrics.items():
            epoch_sums[key] = epoch_sums.get(key, 0.0) + value
          epoch_count += 1
          shown = dict(metrics, **{"img/s": loop.images_per_step * num_steps / elapsed})
          progress.update(current - epoch_start, list(shown.items()))
          if log and (current % run_config.log_every < num_steps or current == epoch_end):
            log.write({"kind": "step", "step": current, "epoch": epoch + 1, **shown}, current)
          if signals.received is not None:
            print(flush=True)  # end the progress bar's line: the message below gets a line of its own
            path = save(state)
            name = signal.Signals(signals.received).name
            raise Interrupted(
              f"{name} received: stopped at step {current} of {loop.total_steps} after saving "
              f"{path}; re-run the same command to resume from step {current}",
              signals.received,
            )
          if current % run_config.checkpoint_every < num_steps and current != epoch_end:
            save(state)
        save(state)
        if log:
          log.write(
            {
              "kind": "epoch",
              "step": current,
              "epoch": epoch + 1,
              **{k: v / epoch_count for k, v in epoch_sums.items()},
            },
            current,
          )
  finally:
    if log:
      log.close()
  return log.path if log else None


def epoch_means(path: str) -> dict[str, np.ndarray]:
  """Per-epoch mean metrics from a metrics log, as a dict of numpy arrays."""
  records = read_log(path, "epoch")
  keys = records[0].keys() if records else []
  return {k: np.array([r[k] for r in records]) for k in keys}
