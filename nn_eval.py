r"""Soft-nearest-neighbour evaluation (METHOD.md section 7).

  python nn_eval.py --config=config.py:digits --workdir=runs/digits

Support = every labeled training image (no augmentation, one-hot labels),
queries = the whole test set, embedded by the encoder's output z (the prediction
head's output when the model has one, as the reference's --use-pred on ImageNet;
else the projection head's), tau from the config, in float32 whatever precision
trained the encoder (as the reference).
Beside soft-NN, on the same embeddings: weighted k-NN (cosine, eval.knn_k = 20
nearest supports, weights exp(similarity / eval.knn_temperature = 0.07)) and a
linear probe (scikit-learn logistic regression on the supports' L2-normalised
embeddings); --config.eval.knn_k=0 and --config.eval.linear_probe=false skip them.
Evaluates the fine-tuned encoder when the workdir has one, else the
pre-trained one (or the one --encoder names). Writes eval.json, a confusion
matrix and a PCA projection of the test embeddings into the workdir. After
classifier fine-tuning (finetune.mode=classifier, the ImageNet recipe) it also
reports the classifier's top-1 and top-5 (Resize + CenterCrop), and the epoch
fine_tune.py --heldout_split_file selected with its held-out top-1. With
--export=DIR it also saves the encoder and supports as a SavedModel that
classifies raw images (utils/export.py; docs/running.md, Using the trained model).
"""

import os

from utils import native_logs

native_logs.set_native_log_level()  # before TensorFlow loads: its C++ start-up chatter stays out
native_logs.use_tf_keras()  # before TensorFlow loads: tf.keras is tf_keras, Keras 3 is never imported

from absl import flags, logging
import tensorflow as tf

from utils import cli, evaluation, export, fileio, plots
from utils import workdir as workdir_lib
from utils.data import sources
from utils.errors import UserError
from utils.model import classifier as classifier_lib
from utils.workdir import Workdir

_CONFIG = cli.define_config_flag("config.py:digits")
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a pre-training (and fine-tuning) run.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "As for paws_train.py: CIFAR-10 offline, or the images' folder.")
_ENCODER = flags.DEFINE_enum(
  "encoder",
  "auto",
  list(evaluation.ENCODER_CHOICES),
  "Which encoder of the workdir to evaluate (auto: fine-tuned if present).",
)
_EXPORT = flags.DEFINE_string(
  "export",
  None,
  "Also save the evaluated model as a SavedModel in this folder (docs/running.md, Using the trained model).",
)


def main(argv):
  del argv
  config = _CONFIG.value
  if not _WORKDIR.value or not tf.io.gfile.isdir(_WORKDIR.value):
    raise UserError(f"workdir {_WORKDIR.value} does not exist; run paws_train.py with this --workdir first")
  workdir = Workdir(workdir_lib.prepare_workdir(_WORKDIR.value))
  if _EXPORT.value:
    export.check_export_directory(_EXPORT.value)  # before the evaluation, which can take minutes

  # --- Encoder (first: a missing one is the commonest mistake): fine-tuned if present, float32 ----
  choice, directory, written_by = evaluation.encoder_directory(workdir, _ENCODER.value)
  encoder = evaluation.load_float32_encoder(directory, config, written_by)

  # --- Data: the labeled subset saved by pre-training (supports) and the test set (queries) --------
  # Arrays, or files streamed from --data_dir: supports from train/, queries from val/ (or data.val_files).
  source = sources.open_source(config.data, _DATA_DIR.value, evaluation=True)
  labeled = source.saved_subset(workdir.labeled_indices, workdir.labeled_files)
  support_images, support_labels, test_images, test_labels = source.evaluation_sets(
    labeled, config.data, config.eval.batch_size
  )

  # --- Evaluate and report -------------------------------------------------------
  metrics, embeddings, confusion = evaluation.evaluate(
    encoder, config.data, config.eval, support_images, support_labels, test_images, test_labels
  )
  metrics.update(
    {
      "encoder": choice,
      "checkpoint": os.path.join(directory, "weights"),
      "config_name": config.name,
      "tau": config.eval.tau,
      "precision": "float32",
    }
  )
  finetuned = workdir.finetuned.root
  if classifier_lib.exists(finetuned):  # finetune.mode=classifier: the classifier's own top-1 / top-5 as well
    model, meta = classifier_lib.load(finetuned, config)  # float32
    queries, query_labels = evaluation.evaluation_images(source, config.data, config.eval.batch_size)
    scores = evaluation.evaluate_classifier(
      model, queries, query_labels, config.eval.batch_size, config.data.mean, config.data.std
    )
    metrics.update({"classifier_top1": scores["top1"], "classifier_top5": scores["top5"]})
    if "selected_epoch" in meta:  # fine_tune.py --heldout_split_file: the epoch its held-out top-1 chose
      metrics.update({"selected_epoch": meta["selected_epoch"], "heldout_top1": meta["heldout_top1"]})
  fileio.write_json(workdir.eval_json, metrics)
  title = f"{config.name}, {choice} encoder, top-1 {metrics['top1']:.2f} %"
  plots.confusion_matrix(confusion, workdir.confusion_matrix, title)
  plots.pca_projection(embeddings, test_labels, workdir.pca_projection, title)
  logging.info("per-class top-1: " + ", ".join(f"{c}: {a:.1f}" for c, a in enumerate(metrics["per_class"])))
  logging.info(
    f"soft-NN top-1 ({choice} encoder, {metrics['num_support']} supports, "
    f"{metrics['num_test']} test images): {metrics['top1']:.2f} %"
  )
  if "knn_top1" in metrics:
    logging.info(
      f"k-NN top-1 (cosine, k = {metrics['knn_k']}, weights exp(similarity / {metrics['knn_temperature']})): "
      f"{metrics['knn_top1']:.2f} %"
    )
  if "linear_probe_top1" in metrics:
    logging.info(
      f"linear-probe top-1 (logistic regression, C = {metrics['linear_probe_C']}, on the {metrics['num_support']} "
      f"supports' normalised embeddings): {metrics['linear_probe_top1']:.2f} %"
    )
    if metrics["linear_probe_iterations"] >= metrics["linear_probe_max_iter"]:
      logging.warning(
        f"warning: the linear probe stopped at max_iter = {metrics['linear_probe_max_iter']} before converging; "
        "its top-1 is that of an unfinished fit"
      )
  if "classifier_top1" in metrics:
    logging.info(
      f"classifier top-1 {metrics['classifier_top1']:.2f} %, top-5 {metrics['classifier_top5']:.2f} % "
      f"({metrics['num_test']} test images, Resize + CenterCrop {config.data.image_size})"
    )
  if "selected_epoch" in metrics:
    logging.info(
      f"classifier of epoch {metrics['selected_epoch']}, selected by its held-out top-1 {metrics['heldout_top1']:.2f} %"
    )
  logging.info(f"results in {workdir.eval_json}")

  # --- Export: the same encoder and supports, tau = eval.tau, as a SavedModel (utils/export.py) ------
  if _EXPORT.value:
    export.export_model(
      _EXPORT.value,
      encoder,
      config.data,
      config.eval,
      support_images,
      support_labels,
      class_names=export.dataset_class_names(config.data.dataset) or source.class_names,
    )
    logging.info(f"SavedModel (signature {export.SIGNATURE_NAME}) and {export.CLASS_NAMES_FILE} in {_EXPORT.value}")


if __name__ == "__main__":
  cli.run_script(main)
