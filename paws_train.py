r"""PAWS pre-training (METHOD.md sections 2 to 5).

  python paws_train.py --config=config.py:digits --workdir=runs/digits
  python paws_train.py --config=config.py:cifar10 --workdir=runs/c10 [--data_dir=DIR]
  python paws_train.py --config=config.py:cifar10 --benchmark=20   # images/s on random data

Re-running the same command resumes from the newest intact checkpoint in the workdir.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of the output
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np
import tensorflow as tf

from utils import datasets
from utils import encoder as encoder_lib
from utils import optim
from utils import pipeline
from utils import plots
from utils import runtime
from utils import steps
from utils import training
from utils.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", "config.py:digits", "Preset and overrides.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and the trained encoder.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "CIFAR-10 offline: folder with cifar-10-python.tar.gz or cifar-10-batches-py/.")
_SPLIT_FILE = flags.DEFINE_string("split_file", None, "Labeled subset as a reference split file (one training index per line).")
_FORCE = flags.DEFINE_bool("force", False, "Reuse a workdir whose saved config differs.")
_BENCHMARK = flags.DEFINE_integer("benchmark", 0, "If > 0: time this many steps on random data and exit.")

# The config sections that define what a pre-training run computes.
RUN_SECTIONS = ("data", "model", "pretrain")


def choose_labeled(train_labels, config, split_file):
  """The labeled subset: read from a split file, or drawn by the label seed."""
  num_classes = len(np.unique(train_labels))
  if split_file:
    return datasets.read_split_file(split_file, len(train_labels), labels=train_labels,
                                    expected_count=config.data.labeled_per_class * num_classes)
  return datasets.select_labeled_indices(train_labels, config.data.labeled_per_class,
                                         config.data.label_seed)


def save_labeled(workdir, indices, force):
  """Saves the labeled indices; refuses to resume a run in this workdir with another subset."""
  saved_path = os.path.join(workdir, "labeled_indices.npy")
  if os.path.exists(saved_path) and not force and not np.array_equal(np.load(saved_path), indices):
    raise UserError(f"{saved_path} holds another labeled subset (other --split_file or label seed); "
                    "use a new --workdir, the same subset, or pass --force to overwrite")
  npy_path, txt_path = datasets.write_split_files(workdir, indices)
  print(f"labeled subset: {len(indices)} images, saved to {npy_path} and {txt_path}")


def check_batch_shapes(config, num_train, num_classes, num_replicas):
  p = config.pretrain
  if p.batch_size > num_train:
    raise UserError(f"pretrain.batch_size={p.batch_size} is larger than the {num_train} training images; lower it")
  if p.classes_per_batch > num_classes:
    raise UserError(f"pretrain.classes_per_batch={p.classes_per_batch} but the data has {num_classes} classes; lower it")
  if p.images_per_class > config.data.labeled_per_class:
    raise UserError(f"pretrain.images_per_class={p.images_per_class} exceeds data.labeled_per_class="
                    f"{config.data.labeled_per_class}; lower it or label more images")
  if p.batch_size % num_replicas or p.images_per_class % num_replicas:
    raise UserError(f"pretrain.batch_size and pretrain.images_per_class must divide by the "
                    f"{num_replicas} replicas")


def main(argv):
  del argv
  config = _CONFIG.value

  # --- Devices and precision -------------------------------------------------
  strategy, jit_compile = runtime.setup_training(config)

  # --- Data --------------------------------------------------------------------
  if _BENCHMARK.value:
    return benchmark(config, strategy, jit_compile, _BENCHMARK.value)
  workdir = runtime.prepare_workdir(_WORKDIR.value)
  train_images, train_labels, _, _ = datasets.load_dataset(config.data.dataset, _DATA_DIR.value)
  num_classes = len(np.unique(train_labels))
  check_batch_shapes(config, len(train_images), num_classes, strategy.num_replicas_in_sync)
  labeled = choose_labeled(train_labels, config, _SPLIT_FILE.value)
  # Everything is validated before the first file is written.
  runtime.check_config(config, os.path.join(workdir, "config.json"), RUN_SECTIONS, _FORCE.value)
  save_labeled(workdir, labeled, _FORCE.value)
  p = config.pretrain
  steps_per_epoch = len(train_images) // p.batch_size
  total_steps = p.epochs * steps_per_epoch

  # --- Model and optimizer -------------------------------------------------------
  schedule = optim.warmup_cosine_schedule(
      p.start_lr, p.lr, p.final_lr, p.warmup_epochs * steps_per_epoch, total_steps)
  with strategy.scope():
    encoder = encoder_lib.build_encoder(config.model, config.data.image_size,
                                        synchronized_bn=strategy.num_replicas_in_sync > 1)
    optimizer = optim.build_lars(schedule, p.momentum, p.weight_decay, p.lars_eta, config.run.precision)
    optimizer._create_all_weights(encoder.trainable_variables)  # slots exist before restore
    step = tf.Variable(0, dtype=tf.int64, name="step")

  # --- Checkpoint: newest intact one in the workdir, else a fresh start ------------
  checkpoint, manager, restored = training.checkpoint_and_restore(
      encoder, optimizer, step, os.path.join(workdir, "checkpoints"), config.run.keep_checkpoints)
  start_step = int(step.numpy())
  print(f"resuming from {restored} at step {start_step}" if restored else "starting from scratch")

  # --- Input stream from start_step ---------------------------------------------
  dataset = pipeline.pretrain_dataset(
      train_images, labeled, train_labels[labeled], batch_size=p.batch_size, multicrop=p.multicrop,
      classes_per_batch=p.classes_per_batch, images_per_class=p.images_per_class,
      support_views=p.support_views, view_options=pipeline.view_options(config.data),
      large_crop_size=config.data.large_crop_size, small_crop_size=config.data.small_crop_size,
      large_crop_scale=config.data.large_crop_scale, small_crop_scale=config.data.small_crop_scale,
      start_step=start_step, total_steps=total_steps, seed=config.seed)
  iterator = iter(dataset)
  train_steps = steps.paws_steps(config, strategy, encoder, optimizer, jit_compile)

  # --- Loop ------------------------------------------------------------------
  started = time.time()
  log_path = training.run_loop(
      train_steps=train_steps, iterator=iterator, step=step, checkpoint=checkpoint, manager=manager,
      workdir=workdir, log_name="pretrain", total_steps=total_steps, steps_per_epoch=steps_per_epoch,
      steps_per_loop=config.run.steps_per_loop, log_every=config.run.log_every,
      checkpoint_every=config.run.checkpoint_every, learning_rate=schedule,
      images_per_step=images_per_step(p))
  print(f"pre-training done: {total_steps} steps, {time.time() - started:.1f} s this run")

  # --- Results -----------------------------------------------------------------
  directory = encoder_lib.save_encoder(encoder, config, os.path.join(workdir, "encoder"), total_steps)
  plot_path = plots.loss_curves(training.epoch_means(log_path), os.path.join(workdir, "pretrain_loss.png"),
                                ("ce", "me_max", "loss"), "PAWS pre-training")
  print(f"encoder saved to {directory}; loss curves in {plot_path}")


def images_per_step(p):
  """Crops embedded per step: unlabeled views plus support views."""
  return p.batch_size * (2 + p.multicrop) + p.support_views * p.images_per_class * p.classes_per_batch


def time_train_steps(config, strategy, jit_compile, num_steps):
  """Seconds per compiled step on random inputs of the config's shapes (after a warm-up)."""
  p = config.pretrain
  large, small = config.data.large_crop_size, config.data.small_crop_size
  views = tuple(tf.random.normal([p.batch_size, large, large, 3]) for _ in range(2)) + tuple(
      tf.random.normal([p.batch_size, small, small, 3]) for _ in range(p.multicrop))
  supports = tf.random.normal([p.support_views, p.images_per_class, p.classes_per_batch, large, large, 3])
  dataset = tf.data.Dataset.from_tensors((views, supports)).repeat()
  schedule = optim.warmup_cosine_schedule(p.start_lr, p.lr, p.final_lr, 10, 1000)
  with strategy.scope():
    encoder = encoder_lib.build_encoder(config.model, config.data.image_size,
                                        synchronized_bn=strategy.num_replicas_in_sync > 1)
    optimizer = optim.build_lars(schedule, p.momentum, p.weight_decay, p.lars_eta, config.run.precision)
    optimizer._create_all_weights(encoder.trainable_variables)  # else the step is traced twice
  train_steps = steps.paws_steps(config, strategy, encoder, optimizer, jit_compile)
  iterator = iter(dataset)
  float(train_steps(iterator, tf.constant(2))["loss"])  # trace and warm up
  start = time.perf_counter()
  float(train_steps(iterator, tf.constant(num_steps))["loss"])
  return (time.perf_counter() - start) / num_steps


def benchmark(config, strategy, jit_compile, num_steps):
  """Prints steps/s and images/s of the compiled step on random data."""
  seconds = time_train_steps(config, strategy, jit_compile, num_steps)
  images = images_per_step(config.pretrain)
  print(f"benchmark: {config.run.precision}, xla={jit_compile}, {strategy.num_replicas_in_sync} replica(s): "
        f"{1 / seconds:.2f} steps/s, {images / seconds:.0f} images/s ({images} crops per step)")


if __name__ == "__main__":
  app.run(runtime.exit_on_user_error(main))
