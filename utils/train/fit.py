"""The one training skeleton of PAWS pre-training, SuNCEt fine-tuning and classifier fine-tuning.

schedule -> train state -> output folder checked -> restore (train_loop.restore's order) -> each replica's
input from the restored step -> compiled steps -> step loop (checkpoints, log, stop signals) -> loss curves.
A stage says what differs: the model and its optimizer, the input, the step; the scripts save the result.
"""

from collections.abc import Callable
import contextlib
import dataclasses

from absl import logging
import tensorflow as tf
import tf_keras

from utils import devices, plots
from utils.data import sampling
from utils.data import service as data_service
from utils.train import loop as train_loop
from utils.workdir import Workdir


@dataclasses.dataclass(frozen=True)
class Stage:
  """What one training stage trains, on what, and how long."""

  name: str  # 'pretrain' or 'finetune': the log file, TensorBoard folder and loss plot are named after it
  title: str  # the loss plot's title
  plot_keys: tuple[str, ...]  # the metrics the loss plot shows
  total_steps: int
  steps_per_epoch: int
  images_per_step: int  # for the img/s column
  schedule: Callable[[int], float]  # step -> learning rate
  make_model: Callable[[], tf_keras.Model]  # called in the strategy's scope
  make_optimizer: Callable[[], tf_keras.optimizers.legacy.Optimizer]  # called in the strategy's scope
  make_dataset: Callable[[sampling.Replicas, int], tf.data.Dataset]  # (replicas, start step) -> their batches
  make_steps: Callable[[train_loop.TrainState], Callable]  # state -> compiled train_steps(iterator, num_steps)
  fresh_start: str = "scratch"  # how a run without a checkpoint starts, for the log
  # current step -> a context turning an input error into a UserError naming the image (Source.stream_errors)
  input_errors: Callable[[Callable[[], int]], contextlib.AbstractContextManager] = lambda current_step: (
    contextlib.nullcontext()
  )
  # After each epoch's checkpoint: (state, epoch from 1) -> more metrics for the epoch's log record, or None.
  after_epoch: Callable[[train_loop.TrainState, int], dict] | None = None


def fit(
  stage: Stage,
  strategy: tf.distribute.Strategy,
  run_config,
  output: Workdir,
  log_dir: Workdir | None,
  prepare: Callable[[], None] | None = None,
) -> train_loop.TrainState:
  """Trains `stage` to its last step, resuming from the newest intact checkpoint in output.checkpoints.

  Args:
    stage: the Stage.
    strategy: the tf.distribute strategy.
    run_config: the config's `run` section (checkpoints kept, steps per call, logging cadence).
    output: this process's folder for checkpoints (every worker writes its own).
    log_dir: where the metrics log, TensorBoard scalars and loss curves go (the chief's), or None.
    prepare: called once the model and optimizer are built and before anything is restored or written
      (fine_tune.py creates and checks its folder there, once the pre-trained encoder is known to load).
  Returns:
    The TrainState after the last step.
  """
  state = train_loop.create_train_state(strategy, stage.make_model, stage.make_optimizer)
  if prepare is not None:
    prepare()
  restored = train_loop.restore(state, output.checkpoints, run_config.keep_checkpoints)
  if devices.align_workers(strategy, state.step, train_loop.state_variables(state)):  # a cluster's workers disagreed
    restored = "another worker's newer checkpoint"
  start_step = int(state.step.numpy())
  logging.info(f"resuming from {restored} at step {start_step}" if restored else f"starting from {stage.fresh_start}")

  # Each worker builds only its replicas' batches from start_step, prefetched to their devices; with
  # run.data_service the same batches are built on tf.data service workers.
  make_dataset = lambda replicas: stage.make_dataset(replicas, start_step)
  if run_config.data_service:
    make_dataset = lambda replicas: data_service.remote_dataset(
      run_config.data_service, stage.make_dataset, replicas, start_step, stage.total_steps
    )
  dataset = sampling.distribute(strategy, make_dataset)
  train_steps = stage.make_steps(state)
  shape = train_loop.Loop(
    stage.name, stage.total_steps, stage.steps_per_epoch, stage.images_per_step, stage.schedule, stage.after_epoch
  )
  current_step = lambda: int(state.step.numpy())
  with lost_workers(strategy, state), stage.input_errors(current_step):
    log_path = train_loop.run_loop(
      train_steps, iter(dataset), state, shape, run_config, log_dir.root if log_dir else None
    )
  if log_dir is not None:
    plot = plots.loss_curves(
      train_loop.epoch_means(log_path), log_dir.loss_plot(stage.name), stage.plot_keys, stage.title
    )
    logging.info(f"loss curves in {plot}")
  return state


def lost_workers(strategy: tf.distribute.Strategy, state: train_loop.TrainState) -> contextlib.AbstractContextManager:
  """In a cluster, a lost worker stops the others within run.collective_timeout, with one line
  (devices.lost_workers), during training and while the scripts save the trained model after it (a
  collective: every worker reads the synchronised BatchNorm statistics)."""
  return devices.lost_workers(strategy, lambda: int(state.step.numpy()), lambda: state.manager.latest_checkpoint)
