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
import sys
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


def state_variables(state: TrainState) -> list[tf.Variable]:
  """Every variable a checkpoint of the state holds, in the same order on every worker: the model's, the
  optimizer's (its slots, hyperparameters and, with mixed_float16, loss scale), the step."""
  trackables = [
    *tf.train.TrackableView(state.model).descendants(),
    *tf.train.TrackableView(state.optimizer).descendants(),
    *state.optimizer.variables(),  # the slots, which the object graph holds apart
    state.step,
  ]
  unique = {id(t): t for t in trackables if isinstance(t, tf.Variable)}
  return list(unique.values())


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
  # After each epoch's checkpoint: (state, epoch number from 1) -> more metrics for the epoch's record
  # (fine_tune.py's held-out top-1), or None.
  after_epoch: Callable[[TrainState, int], dict] | None = None


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


class Progress:
  """What the console shows of the loop: keras' live progress bar on a terminal; in a file (`nohup python
  paws_train.py ... > train.log`), where a live bar would append every update to one line, one plain line
  per `run.log_every` steps and one per epoch."""

  def __init__(self, loop: Loop, start_step: int, log_every: int, interactive: bool):
    self.loop, self.log_every, self.interactive = loop, log_every, interactive
    self.start_step, self.started = start_step, time.perf_counter()
    self.bar = None

  def start_epoch(self, epoch: int, first_step: int, last_step: int) -> None:
    """Before epoch `epoch` (0-based), which runs steps first_step + 1 .. last_step."""
    logging.info(f"epoch {epoch + 1}/{math.ceil(self.loop.total_steps / self.loop.steps_per_epoch)}")
    self.first_step = first_step
    if self.interactive:
      self.bar = tf_keras.utils.Progbar(
        last_step - first_step, stateful_metrics=["lr", "img/s"], verbose=1, unit_name="step"
      )

  def update(self, step: int, num_steps: int, shown: dict) -> None:
    """After the steps up to `step` (num_steps of them in the last call), with the metrics `shown`."""
    if self.interactive:
      self.bar.update(step - self.first_step, list(shown.items()))
    elif step % self.log_every < num_steps:
      logging.info(self.line(f"step {step}/{self.loop.total_steps}", step, shown))

  def end_epoch(self, epoch: int, step: int, means: dict) -> None:
    if not self.interactive:
      logging.info(self.line(f"epoch {epoch + 1} done, step {step}/{self.loop.total_steps}, means", step, means))

  def line(self, head: str, step: int, metrics: dict) -> str:
    """'HEAD: loss -0.6020, ce 1.6466, ..., elapsed 12 s, ETA 1:05': elapsed since this run started."""
    elapsed = time.perf_counter() - self.started
    done = step - self.start_step
    eta = elapsed / done * (self.loop.total_steps - step) if done else 0.0
    values = ", ".join(
      f"{key} {value:.4g}" if key != "img/s" else f"{key} {value:.0f}" for key, value in metrics.items()
    )
    return f"{head}: {values}, elapsed {_duration(elapsed)}, ETA {_duration(eta)}"


def _duration(seconds: float) -> str:
  """'45 s', '12:05' (minutes:seconds) or '3:02:05' (hours)."""
  seconds = round(seconds)
  if seconds < 60:
    return f"{seconds} s"
  minutes, seconds = divmod(seconds, 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def run_loop(
  train_steps: Callable,
  iterator,
  state: TrainState,
  loop: Loop,
  run_config: ConfigDict,
  workdir: str | None,
  interactive: bool | None = None,
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
    interactive: a live progress bar (a terminal) or plain lines (a file); None: whether stdout is a terminal.
  Returns:
    The path of the metrics log (None without a workdir).
  Raises:
    UserError when the loss stops being finite (the last good checkpoint on disk is left as it was);
    Interrupted after saving a checkpoint when SIGTERM or SIGINT arrived.
  """
  log = MetricsLog(workdir, loop.name) if workdir else None
  current = int(state.step.numpy())
  interactive = sys.stdout.isatty() if interactive is None else interactive
  progress = Progress(loop, current, run_config.log_every, interactive)
  try:
    with _StopSignals() as signals:
      while current < loop.total_steps:
        epoch = current // loop.steps_per_epoch
        epoch_start = epoch * loop.steps_per_epoch
        epoch_end = min(epoch_start + loop.steps_per_epoch, loop.total_steps)
        progress.start_epoch(epoch, epoch_start, epoch_end)
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
          progress.update(current, num_steps, shown)
          if log and (current % run_config.log_every < num_steps or current == epoch_end):
            log.write({"kind": "step", "step": current, "epoch": epoch + 1, **shown}, current)
          if signals.received is not None:
            if interactive:
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
        means = {k: v / epoch_count for k, v in epoch_sums.items()}
        if loop.after_epoch is not None:
          means.update(loop.after_epoch(state, epoch + 1))
        progress.end_epoch(epoch, current, means)
        if log:
          log.write({"kind": "epoch", "step": current, "epoch": epoch + 1, **means}, current)
  finally:
    if log:
      log.close()
  return log.path if log else None


def epoch_means(path: str) -> dict[str, np.ndarray]:
  """Per-epoch mean metrics from a metrics log, as a dict of numpy arrays."""
  records = read_log(path, "epoch")
  keys = records[0].keys() if records else []
  return {k: np.array([r[k] for r in records]) for k in keys}
