r"""PAWS pre-training (METHOD.md sections 2 to 5).

  python paws_train.py --config=config.py:digits --workdir=runs/digits
  python paws_train.py --config=config.py:cifar10 --workdir=runs/c10 [--data_dir=DIR]
  python paws_train.py --config=config.py:cifar10 --benchmark=20   # images/s on random data

Re-running the same command resumes from the newest intact checkpoint in the workdir.
"""

from utils import native_logs

native_logs.set_native_log_level()  # before TensorFlow loads: its C++ start-up chatter stays out
native_logs.use_tf_keras()  # before TensorFlow loads: tf.keras is tf_keras, Keras 3 is never imported
import time

from absl import flags, logging
import numpy as np
import tensorflow as tf

from utils import cli, devices, fileio
from utils import workdir as workdir_lib
from utils.data import sampling, sources, splits
from utils.errors import UserError
from utils.model import encoder as encoder_lib
from utils.train import benchmark, fit, optim, steps
from utils.workdir import Workdir

_CONFIG = cli.define_config_flag("config.py:digits")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and the trained encoder.")
_DATA_DIR = flags.DEFINE_string(
  "data_dir",
  None,
  "CIFAR-10 offline: folder with cifar-10-python.tar.gz or cifar-10-batches-py/; data.dataset=folder or "
  "tfrecord: the folder of the images; tfds: TFDS's data_dir (docs/data.md, Your own data).",
)
_SPLIT_FILE = flags.DEFINE_string(
  "split_file",
  None,
  "Labeled subset as a split file: one training index per line (the reference's format), or for folder, "
  "tfrecord and tfds data one file name per line; tfds data also tfds:SUBSET, the file names of a prepared "
  "TFDS dataset (tfds:imagenet2012_subset/10pct).",
)
_FORCE = flags.DEFINE_bool("force", False, "Reuse a workdir whose saved config differs.")
_BENCHMARK = flags.DEFINE_integer("benchmark", 0, "If > 0: time this many steps on random data and exit.")

# The config sections that define what a pre-training run computes.
RUN_SECTIONS = ("data", "model", "pretrain")


def choose_labeled(source, config, split_file):
  """The labeled subset (indices into source.train_labels): read from a split file, or drawn by the label seed."""
  per_class = config.data.labeled_per_class
  if split_file:
    # labeled_per_class = 0: the file decides (e.g. the reference's ImageNet 1 % / 10 % lists, unbalanced).
    count = per_class * source.num_classes if per_class else None
    return source.read_split_file(split_file, expected_count=count, check_balance=bool(per_class))
  if not per_class:
    raise UserError("data.labeled_per_class=0 means the labeled subset comes from --split_file; pass one")
  return splits.select_labeled_indices(source.train_labels, config.data.labeled_per_class, config.data.label_seed)


def save_labeled(workdir, indices, force):
  """Saves the labeled indices into a Workdir; refuses to resume a run in it with another subset."""
  saved_path = workdir.labeled_indices_npy
  if tf.io.gfile.exists(saved_path) and not force and not np.array_equal(fileio.read_npy(saved_path), indices):
    raise UserError(
      f"{saved_path} holds another labeled subset (other --split_file or label seed); "
      "use a new --workdir, the same subset, or pass --force to overwrite"
    )
  npy_path, txt_path = splits.write_split_files(workdir.labeled_indices_npy, workdir.labeled_indices, indices)
  logging.info(f"labeled subset: {len(indices)} images, saved to {npy_path} and {txt_path}")


def main(argv):
  del argv
  config = _CONFIG.value

  # --- Devices and precision -------------------------------------------------
  strategy, jit_compile = devices.setup_training(config)
  if _BENCHMARK.value:  # timing on random data only: no workdir, no dataset
    logging.info(benchmark.report(config, strategy, jit_compile, _BENCHMARK.value))
    return

  # --- Data --------------------------------------------------------------------
  workdir = Workdir(workdir_lib.prepare_workdir(_WORKDIR.value))
  # In a cluster the chief writes the config, logs and plots into the workdir; every worker keeps its
  # checkpoints, encoder and labeled subset in its own folder (the workdir itself on the chief).
  own = Workdir(workdir_lib.prepare_workdir(workdir.worker().root))
  chief = own == workdir
  # In-memory arrays (cifar10, digits) or image files streamed from --data_dir (folder, tfrecord).
  source = sources.open_source(config.data, _DATA_DIR.value)
  sampling.check_pretrain_sizes(  # before anything is written
    config.pretrain,
    config.data.labeled_per_class,
    source.num_unlabeled,
    source.num_classes,
    strategy.num_replicas_in_sync,
  )
  labeled = choose_labeled(source, config, _SPLIT_FILE.value)
  source.check_images(labeled)  # files: every labeled image decodes
  if not _FORCE.value:
    source.check_labeled_names(own.labeled_files, labeled)  # files: resuming on the images this workdir labeled
  # Everything is validated before the first file is written.
  if chief:
    workdir_lib.check_config(config, workdir.config, RUN_SECTIONS, _FORCE.value)
  save_labeled(own, labeled, _FORCE.value)
  source.write_labeled_names(own.labeled_files, labeled)
  p = config.pretrain
  # Which images every step reads: one plan for the input pipeline and for naming an unreadable image.
  num_replicas = strategy.num_replicas_in_sync
  plan = sampling.PawsPlan(labeled, source.train_labels, source.num_unlabeled, p, config.seed, num_replicas)
  steps_per_epoch = plan.steps_per_epoch
  total_steps = p.epochs * steps_per_epoch

  # --- Model, optimizer, input, step: trained by the shared skeleton (utils/train/fit.py) ----------
  schedule = optim.warmup_cosine_schedule(p.start_lr, p.lr, p.final_lr, p.warmup_epochs * steps_per_epoch, total_steps)
  stage = fit.Stage(
    name="pretrain",
    title="PAWS pre-training",
    plot_keys=("ce", "me_max", "loss"),
    total_steps=total_steps,
    steps_per_epoch=steps_per_epoch,
    images_per_step=benchmark.crops_per_step(p),
    schedule=schedule,
    make_model=lambda: encoder_lib.build_for_strategy(config, strategy),
    make_optimizer=lambda: optim.build_lars(schedule, p.momentum, p.weight_decay, p.lars_eta, config.run.precision),
    make_dataset=lambda replicas, start_step: source.pretrain_dataset(
      plan, config.data, p, start_step=start_step, total_steps=total_steps, replicas=replicas
    ),
    make_steps=lambda state: steps.paws_steps(config, strategy, state.model, state.optimizer, jit_compile),
    input_errors=lambda current_step: source.stream_errors(plan, current_step, config.run.steps_per_loop),
  )
  started = time.time()
  state = fit.fit(stage, strategy, config.run, own, workdir if chief else None)
  logging.info(f"pre-training done: {total_steps} steps, {time.time() - started:.1f} s this run")

  # --- Results -----------------------------------------------------------------
  # Every worker saves (reading the synchronised BatchNorm statistics is a collective): a worker lost
  # meanwhile is one error line, as in training.
  with fit.lost_workers(strategy, state):
    directory = encoder_lib.save_encoder(state.model, config, own.encoder, total_steps, "pretrain")
  logging.info(f"encoder saved to {directory}")


if __name__ == "__main__":
  cli.run_script(main)
