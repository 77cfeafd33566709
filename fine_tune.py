r"""Fine-tuning with the SuNCEt loss on the labeled images only (METHOD.md section 6).

  python fine_tune.py --config=config.py:digits --workdir=runs/digits

Starts from the encoder paws_train.py saved in the workdir, trains the whole
network with class-stratified flip-only batches, BatchNorm statistics frozen
(scale/offset still trained), LARS over SGD momentum, cosine learning rate.
Never looks at the test set. Re-running resumes from the newest checkpoint.

  python fine_tune.py --config=config.py:imagenet --data_dir=IMAGENET --workdir=runs/in10 --heldout_split_file=val.txt
(finetune.mode=classifier) keeps the classifier of the epoch with the best top-1 on those training images, held
out from the labeled subset (the reference's imagenet_subsets/val.txt), instead of the last epoch's.

  python fine_tune.py --config=config.py:digits --workdir=runs/sup --from_scratch
trains the same network on the labeled images alone (the supervised-only
baseline; BatchNorm then uses batch statistics, as a fresh network must, and its
moving statistics are re-estimated on the clean labeled images at the end).
"""

from utils import native_logs

native_logs.set_native_log_level()  # before TensorFlow loads: its C++ start-up chatter stays out
native_logs.use_tf_keras()  # before TensorFlow loads: tf.keras is tf_keras, Keras 3 is never imported

from absl import flags, logging
import numpy as np

from utils import cli, devices, evaluation
from utils import workdir as workdir_lib
from utils.data import sampling, sources, splits
from utils.errors import UserError
from utils.model import classifier as classifier_lib
from utils.model import encoder as encoder_lib
from utils.train import fit, optim, steps
from utils.workdir import Workdir

_CONFIG = cli.define_config_flag("config.py:digits")
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a pre-training run; results go to WORKDIR/finetuned.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "As for paws_train.py: CIFAR-10 offline, or the images' folder.")
_FORCE = flags.DEFINE_bool("force", False, "Reuse a fine-tuning folder whose saved config differs.")
_HELDOUT = flags.DEFINE_string(
  "heldout_split_file",
  None,
  "finetune.mode=classifier: training images held out from the labeled subset (names or indices, as "
  "--split_file); the classifier of the epoch with the best top-1 on them is kept (the reference's ImageNet "
  "selection on imagenet_subsets/val.txt).",
)
_FROM_SCRATCH = flags.DEFINE_bool(
  "from_scratch", False, "Supervised-only baseline: random init, labeled subset drawn by data.label_seed."
)

RUN_SECTIONS = ("data", "model", "finetune")


class HeldOutSelection:
  """after_epoch hook of classifier fine-tuning with --heldout_split_file: the epoch's top-1 on the held-out
  images (Resize + CenterCrop, as the classifier's evaluation); the classifier is saved into `directory` when it
  beats the best so far (read back from classifier.json on resume), with selected_epoch and heldout_top1.
  Every worker evaluates and saves into its own folder (see main)."""

  def __init__(self, config, source, indices, directory):
    self.config, self.directory, self.count = config, directory, len(indices)
    self.images, self.labels = evaluation.heldout_images(source, indices, config.data, config.eval.batch_size)
    meta = classifier_lib.read_meta(directory) or {}
    self.best, self.best_epoch = meta.get("heldout_top1"), meta.get("selected_epoch")

  def __call__(self, state, epoch):
    data = self.config.data
    top1 = evaluation.evaluate_classifier(
      state.model, self.images, self.labels, self.config.eval.batch_size, data.mean, data.std
    )["top1"]
    improved = self.best is None or top1 > self.best
    if improved:
      self.best, self.best_epoch = top1, epoch
      classifier_lib.save(
        state.model,
        self.config,
        self.directory,
        int(state.step.numpy()),
        selected_epoch=epoch,
        heldout_top1=top1,
        heldout_images=self.count,
      )
    logging.info(
      f"epoch {epoch}: held-out top-1 {top1:.2f} % ({self.count} images); best {self.best:.2f} % at epoch "
      f"{self.best_epoch}" + ("; classifier saved" if improved else "")
    )
    return {"heldout_top1": top1}


def heldout_indices(source, labeled, path):
  """The training images of --heldout_split_file, none of them labeled, all decodable."""
  indices = source.read_split_file(path, check_balance=False)
  shared = np.intersect1d(indices, labeled)
  if len(shared):
    first = source.train_names[shared[0]] if source.train_names is not None else f"index {shared[0]}"
    raise UserError(
      f"--heldout_split_file={path} holds {len(shared)} image(s) of the labeled subset ({first} first); "
      "hold out training images outside the labeled subset"
    )
  source.check_images(indices)
  return indices


def classifier_stage(config, strategy, jit_compile, source, labeled, workdir, after_epoch=None):
  """finetune.mode=classifier: the reference's ImageNet fine-tuning (model/classifier.py, METHOD.md section 10)."""
  f = config.finetune
  plan = sampling.ClassifierPlan(labeled, source.train_labels, f, config.seed, strategy.num_replicas_in_sync)
  steps_per_epoch = plan.steps_per_epoch
  total_steps = f.epochs * steps_per_epoch
  schedule = optim.warmup_cosine_schedule(f.lr, f.lr, f.final_lr, 0, total_steps)  # cosine from step 0
  encoder_dir = None if _FROM_SCRATCH.value else workdir.encoder
  return fit.Stage(
    name="finetune",
    title="Classifier fine-tuning",
    plot_keys=("loss",),
    total_steps=total_steps,
    steps_per_epoch=steps_per_epoch,
    images_per_step=f.batch_size,
    schedule=schedule,
    make_model=lambda: classifier_lib.build(config, source.num_classes, encoder_dir),
    make_optimizer=lambda: optim.build_sgd(schedule, f.momentum, config.run.precision),
    make_dataset=lambda replicas, start_step: source.classifier_dataset(
      plan, config.data, start_step=start_step, total_steps=total_steps, replicas=replicas
    ),
    make_steps=lambda state: steps.classifier_steps(config, strategy, state.model, state.optimizer, jit_compile),
    fresh_start="a random initialisation" if _FROM_SCRATCH.value else "the pre-trained encoder",
    input_errors=lambda current_step: source.stream_errors(plan, current_step, config.run.steps_per_loop),
    after_epoch=after_epoch,
  )


def suncet_stage(config, strategy, jit_compile, source, labeled, workdir):
  """finetune.mode=suncet: SuNCEt on class-stratified flip-only batches of the labeled subset (METHOD.md section 6)."""
  f = config.finetune
  plan = sampling.SuncetPlan(labeled, source.train_labels, f, config.seed, strategy.num_replicas_in_sync)
  steps_per_epoch = plan.steps_per_epoch
  total_steps = f.epochs * steps_per_epoch
  schedule = optim.warmup_cosine_schedule(0.0, f.lr, f.final_lr, 0, total_steps)
  if _FROM_SCRATCH.value:
    make_encoder = lambda: encoder_lib.build_for_strategy(config, strategy)
  else:  # the pre-trained encoder; a newer fine-tuning checkpoint, if any, is restored over it
    make_encoder = lambda: encoder_lib.load_encoder(workdir.encoder, config, "paws_train.py")[0]
  return fit.Stage(
    name="finetune",
    title="SuNCEt fine-tuning",
    plot_keys=("loss",),
    total_steps=total_steps,
    steps_per_epoch=steps_per_epoch,
    images_per_step=f.views * f.images_per_class * f.classes_per_batch,
    schedule=schedule,
    make_model=make_encoder,
    make_optimizer=lambda: optim.build_lars(schedule, f.momentum, f.weight_decay, f.lars_eta, config.run.precision),
    make_dataset=lambda replicas, start_step: source.finetune_dataset(
      plan, f, config.data, start_step=start_step, total_steps=total_steps, replicas=replicas
    ),
    make_steps=lambda state: steps.suncet_steps(
      config, strategy, state.model, state.optimizer, jit_compile, bn_training=_FROM_SCRATCH.value
    ),
    fresh_start="a random initialisation" if _FROM_SCRATCH.value else "the pre-trained encoder",
    input_errors=lambda current_step: source.stream_errors(plan, current_step, config.run.steps_per_loop),
  )


def main(argv):
  del argv
  config = _CONFIG.value
  if not _WORKDIR.value:
    raise UserError("--workdir is required: the workdir of a paws_train.py run")
  strategy, jit_compile = devices.setup_training(config)

  # --- Data: the labeled subset only -------------------------------------------
  # In a cluster, each worker reads and writes its own folder (paws_train.py); only the chief logs and plots.
  workdir = Workdir(_WORKDIR.value).worker()
  chief = devices.is_chief()
  source = sources.open_source(config.data, _DATA_DIR.value)  # arrays, or files streamed from --data_dir
  if _FROM_SCRATCH.value:
    workdir_lib.prepare_workdir(workdir.root)
    if not config.data.labeled_per_class:
      raise UserError("--from_scratch draws its labeled subset by data.labeled_per_class; set it above 0")
    labeled = splits.select_labeled_indices(source.train_labels, config.data.labeled_per_class, config.data.label_seed)
    source.check_images(labeled)
    splits.write_split_files(workdir.labeled_indices_npy, workdir.labeled_indices, labeled)
    source.write_labeled_names(workdir.labeled_files, labeled)
  else:
    labeled = source.saved_subset(workdir.labeled_indices, workdir.labeled_files)
    source.check_images(labeled)

  # --- Model, optimizer, input, step: the shared skeleton (utils/train/fit.py) -----------------------
  classifier = config.finetune.mode == "classifier"
  output = workdir.finetuned
  selection = None
  if _HELDOUT.value:
    if not classifier:
      raise UserError("--heldout_split_file selects among epochs of finetune.mode=classifier only")
    selection = HeldOutSelection(config, source, heldout_indices(source, labeled, _HELDOUT.value), output.root)
  if classifier:
    stage = classifier_stage(config, strategy, jit_compile, source, labeled, workdir, selection)
  else:
    stage = suncet_stage(config, strategy, jit_compile, source, labeled, workdir)

  def prepare_output():  # written only now that the encoder and the config are known to fit
    workdir_lib.prepare_workdir(output.root)
    if chief:
      workdir_lib.check_config(config, output.config, RUN_SECTIONS, _FORCE.value)

  state = fit.fit(stage, strategy, config.run, output, output if chief else None, prepare=prepare_output)

  # --- Results: every worker saves (see paws_train.py) -----------------------------------------------
  with fit.lost_workers(strategy, state):
    if selection is not None:  # saved by the hook, at the best epoch
      logging.info(
        f"fine-tuning done: {stage.total_steps} steps; classifier of epoch {selection.best_epoch} (held-out top-1 "
        f"{selection.best:.2f} %) saved to {output.root} (nn_eval.py reports its top-1/top-5)"
      )
      return
    if classifier:
      classifier_lib.save(state.model, config, output.root, stage.total_steps)
      logging.info(
        f"fine-tuning done: {stage.total_steps} steps; classifier saved to {output.root} "
        "(nn_eval.py reports its top-1/top-5)"
      )
      return
    if _FROM_SCRATCH.value:
      # Trained with batch statistics: its moving averages must be re-estimated before
      # inference-mode evaluation (on the clean labeled images; the test set is never used).
      encoder_lib.reestimate_batch_norm(state.model, source.labeled_images(labeled, config.data))
    encoder_lib.save_encoder(state.model, config, output.root, stage.total_steps, "finetune")
    logging.info(f"fine-tuning done: {stage.total_steps} steps; encoder saved to {output.root}")


if __name__ == "__main__":
  cli.run_script(main)
