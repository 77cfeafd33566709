r"""Fine-tuning with the SuNCEt loss on the labeled images only (METHOD.md section 6).

  python fine_tune.py --config=config.py:digits --workdir=runs/digits

Starts from the encoder paws_train.py saved in the workdir, trains the whole
network with class-stratified flip-only batches, BatchNorm statistics frozen
(scale/offset still trained), LARS over SGD momentum, cosine learning rate.
Never looks at the test set. Re-running resumes from the newest checkpoint.

  python fine_tune.py --config=config.py:digits --workdir=runs/sup --from_scratch
trains the same network on the labeled images alone (the supervised-only
baseline; BatchNorm then uses batch statistics, as a fresh network must, and its
moving statistics are re-estimated on the clean labeled images at the end).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of the output

from absl import flags, logging
import numpy as np
import tensorflow as tf

from utils import cli, devices, plots
from utils import workdir as workdir_lib
from utils.data import pipelines, sampling, sources, splits
from utils.errors import UserError
from utils.model import classifier as classifier_lib
from utils.model import encoder as encoder_lib
from utils.train import loop as train_loop
from utils.train import optim, steps

_CONFIG = cli.define_config_flag("config.py:digits")
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a pre-training run; results go to WORKDIR/finetuned.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "As for paws_train.py: CIFAR-10 offline, or the images' folder.")
_FORCE = flags.DEFINE_bool("force", False, "Reuse a fine-tuning folder whose saved config differs.")
_FROM_SCRATCH = flags.DEFINE_bool(
  "from_scratch", False, "Supervised-only baseline: random init, labeled subset drawn by data.label_seed."
)

RUN_SECTIONS = ("data", "model", "finetune")


def prepare_output(config, state, workdir, chief):
  """WORKDIR/finetuned: its config checked (chief), the newest checkpoint restored. Returns (folder, start step)."""
  output = workdir_lib.prepare_workdir(os.path.join(workdir, "finetuned"))
  if chief:
    workdir_lib.check_config(config, os.path.join(output, "config.json"), RUN_SECTIONS, _FORCE.value)
  restored = train_loop.restore(state, os.path.join(output, "checkpoints"), config.run.keep_checkpoints)
  start_step = int(state.step.numpy())
  logging.info(
    f"resuming from {restored} at step {start_step}"
    if restored
    else "starting from " + ("a random initialisation" if _FROM_SCRATCH.value else "the pre-trained encoder")
  )
  return output, start_step


def fine_tune_classifier(config, strategy, jit_compile, source, labeled, workdir, chief):
  """finetune.mode=classifier: the reference's ImageNet fine-tuning (utils/classifier.py, METHOD.md section 10)."""
  f = config.finetune
  if f.batch_size % strategy.num_replicas_in_sync:
    raise UserError(f"finetune.batch_size={f.batch_size} must divide by the {strategy.num_replicas_in_sync} replicas")
  steps_per_epoch = sampling.steps_per_epoch(len(labeled), f.batch_size)
  total_steps = f.epochs * steps_per_epoch
  schedule = optim.warmup_cosine_schedule(f.lr, f.lr, f.final_lr, 0, total_steps)  # cosine from step 0
  encoder_dir = None if _FROM_SCRATCH.value else os.path.join(workdir, "encoder")
  state = train_loop.create_classifier_state(
    strategy, lambda: classifier_lib.build(config, source.num_classes, encoder_dir), schedule, f, config.run.precision
  )
  output, start_step = prepare_output(config, state, workdir, chief)
  dataset = sampling.distribute(
    strategy,
    lambda replicas: pipelines.replicas_dataset(
      source, labeled, config, replicas, start_step=start_step, total_steps=total_steps, seed=config.seed
    ),
  )
  train_steps = steps.classifier_steps(config, strategy, state.encoder, state.optimizer, jit_compile)
  loop = train_loop.Loop("finetune", total_steps, steps_per_epoch, f.batch_size, schedule)
  with source.stream_errors(lambda: int(state.step.numpy()), config.run.steps_per_loop):
    log_path = train_loop.run_loop(train_steps, iter(dataset), state, loop, config.run, output if chief else None)
  classifier_lib.save(state.encoder, config, output, total_steps)
  if chief:
    plots.loss_curves(
      train_loop.epoch_means(log_path), os.path.join(output, "finetune_loss.png"), ("loss",), "Classifier fine-tuning"
    )
  logging.info(
    f"fine-tuning done: {total_steps} steps; classifier saved to {output} (nn_eval.py reports its top-1/top-5)"
  )


def main(argv):
  del argv
  config = _CONFIG.value
  f = config.finetune
  if not _WORKDIR.value:
    raise UserError("--workdir is required: the workdir of a paws_train.py run")
  strategy, jit_compile = devices.setup_training(config)

  # --- Data: the labeled subset only -------------------------------------------
  # In a cluster, each worker reads and writes its own folder (paws_train.py); only the chief logs and plots.
  workdir = workdir_lib.worker_directory(_WORKDIR.value)
  chief = devices.is_chief()
  source = sources.open_source(config.data, _DATA_DIR.value)  # arrays, or files streamed from --data_dir
  train_labels = source.train_labels
  if _FROM_SCRATCH.value:
    workdir_lib.prepare_workdir(workdir)
    if not config.data.labeled_per_class:
      raise UserError("--from_scratch draws its labeled subset by data.labeled_per_class; set it above 0")
    labeled = splits.select_labeled_indices(train_labels, config.data.labeled_per_class, config.data.label_seed)
    source.check_images(labeled)
    splits.write_split_files(workdir, labeled)
    source.write_labeled_names(workdir, labeled)
  else:
    index_path = os.path.join(workdir, "labeled_indices.txt")
    if not tf.io.gfile.exists(index_path):
      raise UserError(f"{index_path} not found; run paws_train.py with this --workdir first")
    labeled = splits.read_split_file(index_path, len(train_labels))
    source.check_labeled_names(workdir, labeled)  # files: still the images paws_train.py labeled
    source.check_images(labeled)
  if f.mode == "classifier":
    return fine_tune_classifier(config, strategy, jit_compile, source, labeled, workdir, chief)
  sampling.support_rows_per_replica(
    f.classes_per_batch, f.images_per_class, strategy.num_replicas_in_sync, section="finetune."
  )
  per_class = int(np.bincount(train_labels[labeled]).min())
  steps_per_epoch = max(per_class // f.images_per_class, 1)
  total_steps = f.epochs * steps_per_epoch

  # --- Model, optimizer, checkpoint: newest intact checkpoint, else the pre-trained encoder --------
  schedule = optim.warmup_cosine_schedule(0.0, f.lr, f.final_lr, 0, total_steps)
  if _FROM_SCRATCH.value:
    make_encoder = lambda: encoder_lib.build_for_strategy(config, strategy)
  else:
    make_encoder = lambda: encoder_lib.load_encoder(os.path.join(workdir, "encoder"), config, "paws_train.py")[0]
  state = train_loop.create_train_state(strategy, make_encoder, schedule, f, config.run.precision)
  # Written only now that the encoder and the config are known to fit.
  output, start_step = prepare_output(config, state, workdir, chief)

  # --- Loop ------------------------------------------------------------------
  dataset = sampling.distribute(
    strategy,
    lambda replicas: source.finetune_dataset(
      labeled, f, config.data, start_step=start_step, total_steps=total_steps, seed=config.seed, replicas=replicas
    ),
  )
  train_steps = steps.suncet_steps(
    config, strategy, state.encoder, state.optimizer, jit_compile, bn_training=_FROM_SCRATCH.value
  )
  loop = train_loop.Loop(
    "finetune", total_steps, steps_per_epoch, f.views * f.images_per_class * f.classes_per_batch, schedule
  )
  with source.stream_errors(lambda: int(state.step.numpy()), config.run.steps_per_loop):
    log_path = train_loop.run_loop(train_steps, iter(dataset), state, loop, config.run, output if chief else None)

  # --- Results -----------------------------------------------------------------
  if _FROM_SCRATCH.value:
    # Trained with batch statistics: its moving averages must be re-estimated before
    # inference-mode evaluation (on the clean labeled images; the test set is never used).
    encoder_lib.reestimate_batch_norm(state.encoder, source.labeled_images(labeled, config.data))
  encoder_lib.save_encoder(state.encoder, config, output, total_steps)  # every worker (see paws_train.py)
  if chief:
    plots.loss_curves(
      train_loop.epoch_means(log_path), os.path.join(output, "finetune_loss.png"), ("loss",), "SuNCEt fine-tuning"
    )
  logging.info(f"fine-tuning done: {total_steps} steps; encoder saved to {output}")


if __name__ == "__main__":
  cli.run_script(main)
