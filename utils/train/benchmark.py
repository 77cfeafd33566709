"""Timing of the compiled PAWS train step on random inputs of a config's shapes (`paws_train.py --benchmark`)."""

import time

from ml_collections import ConfigDict
import tensorflow as tf

from utils.data import sampling
from utils.model import encoder as encoder_lib
from utils.train import loop as train_loop
from utils.train import optim, steps


def crops_per_step(pretrain: ConfigDict) -> int:
  """Crops embedded per pre-training step: unlabeled views plus support views."""
  p = pretrain
  return p.batch_size * (2 + p.multicrop) + p.support_views * p.images_per_class * p.classes_per_batch


def time_train_steps(config: ConfigDict, strategy: tf.distribute.Strategy, jit_compile: bool, num_steps: int) -> float:
  """Seconds per compiled PAWS step on random inputs of the config's shapes, after a warm-up."""
  p = config.pretrain
  large, small = config.data.large_crop_size, config.data.small_crop_size
  geometry = sampling.pretrain_geometry(p, strategy.num_replicas_in_sync)
  local_batch, local_support = geometry.local_batch, geometry.local_support
  views = tuple(tf.random.normal([local_batch, large, large, 3]) for _ in range(2)) + tuple(
    tf.random.normal([local_batch, small, small, 3]) for _ in range(p.multicrop)
  )
  supports = tf.random.normal([p.support_views, local_support, large, large, 3])
  # Every replica gets the same random batch, on its device as in training.
  dataset = sampling.distribute(strategy, lambda _: tf.data.Dataset.from_tensors((views, supports)).repeat())
  schedule = optim.warmup_cosine_schedule(p.start_lr, p.lr, p.final_lr, 10, 1000)
  state = train_loop.create_train_state(
    strategy,
    lambda: encoder_lib.build_for_strategy(config, strategy),
    lambda: optim.build_lars(schedule, p.momentum, p.weight_decay, p.lars_eta, config.run.precision),
  )
  train_steps = steps.paws_steps(config, strategy, state.model, state.optimizer, jit_compile)
  iterator = iter(dataset)
  float(train_steps(iterator, tf.constant(2))["loss"])  # trace and warm up
  start = time.perf_counter()
  float(train_steps(iterator, tf.constant(num_steps))["loss"])
  return (time.perf_counter() - start) / num_steps


def report(config: ConfigDict, strategy: tf.distribute.Strategy, jit_compile: bool, num_steps: int) -> str:
  """One line: steps/s and crops/s of the compiled step on this machine."""
  seconds = time_train_steps(config, strategy, jit_compile, num_steps)
  crops = crops_per_step(config.pretrain)
  return (
    f"benchmark: {config.run.precision}, xla={jit_compile}, {strategy.num_replicas_in_sync} replica(s): "
    f"{1 / seconds:.2f} steps/s, {crops / seconds:.0f} crops/s ({crops} crops per step)"
  )
