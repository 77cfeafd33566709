r"""Soft-nearest-neighbour evaluation (METHOD.md section 7).

  python nn_eval.py --config=config.py:digits --workdir=runs/digits

Support = every labeled training image (no augmentation, one-hot labels),
queries = the whole test set, projection-head embeddings, tau from the config.
Evaluates the fine-tuned encoder when the workdir has one, else the
pre-trained one (or the one --encoder names). Writes eval.json, a confusion
matrix and a PCA projection of the test embeddings into the workdir.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of the output

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np
import tensorflow as tf

from utils import datasets
from utils import encoder as encoder_lib
from utils import losses
from utils import pipeline
from utils import plots
from utils import runtime
from utils.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", "config.py:digits", "Preset and overrides.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a pre-training (and fine-tuning) run.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "CIFAR-10 offline folder, as for paws_train.py.")
_ENCODER = flags.DEFINE_enum("encoder", "auto", ["auto", "pretrained", "finetuned"],
                             "Which encoder of the workdir to evaluate (auto: fine-tuned if present).")


def embed(encoder, images, batch_size, mean, std):
  """Projection-head embeddings of images in batches (memory flat in len(images))."""
  parts = [encoder(batch, training=False)[0] for batch in pipeline.eval_dataset(images, batch_size, mean, std)]
  return tf.cast(tf.concat(parts, axis=0), tf.float32)


def soft_nn_predict(support, support_labels, queries, num_classes, tau, batch_size):
  """SNN class probabilities of the queries, in batches of queries."""
  one_hot = tf.one_hot(support_labels, num_classes)
  return tf.concat([losses.snn(queries[i:i + batch_size], support, one_hot, tau)
                    for i in range(0, len(queries), batch_size)], axis=0).numpy()


def evaluate(encoder, config, train_images, train_labels, labeled, test_images, test_labels):
  """Returns (metrics dict, test embeddings, confusion matrix)."""
  num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  e = config.eval
  support = embed(encoder, train_images[labeled], e.batch_size, config.data.mean, config.data.std)
  queries = embed(encoder, test_images, e.batch_size, config.data.mean, config.data.std)
  predictions = soft_nn_predict(support, train_labels[labeled], queries, num_classes, e.tau,
                                e.batch_size).argmax(axis=1)
  confusion = np.zeros([num_classes, num_classes], dtype=np.int64)
  np.add.at(confusion, (test_labels, predictions), 1)
  per_class = 100.0 * np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
  metrics = {"top1": 100.0 * float(np.mean(predictions == test_labels)),
             "per_class": [round(float(x), 3) for x in per_class],
             "num_support": int(len(labeled)), "num_test": int(len(test_labels))}
  return metrics, queries.numpy(), confusion


def main(argv):
  del argv
  config = _CONFIG.value
  workdir = _WORKDIR.value
  if not workdir or not os.path.isdir(workdir):
    raise UserError(f"workdir {workdir} does not exist; run paws_train.py with this --workdir first")
  runtime.prepare_workdir(workdir)
  runtime.set_precision(config)

  # --- Encoder: fine-tuned if present (or asked), else pre-trained ---------------
  choice = _ENCODER.value
  if choice == "auto":
    choice = "finetuned" if os.path.exists(os.path.join(workdir, "finetuned", "encoder.json")) else "pretrained"
  directory = os.path.join(workdir, "finetuned" if choice == "finetuned" else "encoder")
  encoder, meta = encoder_lib.load_encoder(
      directory, config, "fine_tune.py" if choice == "finetuned" else "paws_train.py")

  # --- Data: the labeled subset saved by pre-training --------------------------
  train_images, train_labels, test_images, test_labels = datasets.load_dataset(
      config.data.dataset, _DATA_DIR.value)
  index_path = os.path.join(workdir, "labeled_indices.txt")
  if not os.path.exists(index_path):
    raise UserError(f"{index_path} not found; run paws_train.py with this --workdir first")
  labeled = datasets.read_split_file(index_path, len(train_labels))

  # --- Evaluate and report -------------------------------------------------------
  metrics, embeddings, confusion = evaluate(
      encoder, config, train_images, train_labels, labeled, test_images, test_labels)
  metrics.update({"encoder": choice, "checkpoint": os.path.join(directory, "weights"),
                  "config_name": config.name, "tau": config.eval.tau})
  runtime.write_json(os.path.join(workdir, "eval.json"), metrics)
  title = f"{config.name}, {choice} encoder, top-1 {metrics['top1']:.2f} %"
  plots.confusion_matrix(confusion, os.path.join(workdir, "confusion_matrix.png"), title)
  plots.pca_projection(embeddings, test_labels, os.path.join(workdir, "pca_projection.png"), title)
  print("per-class top-1: " + ", ".join(f"{c}: {a:.1f}" for c, a in enumerate(metrics["per_class"])))
  print(f"soft-NN top-1 ({choice} encoder, {metrics['num_support']} supports, "
        f"{metrics['num_test']} test images): {metrics['top1']:.2f} %")
  print(f"results in {os.path.join(workdir, 'eval.json')}")


if __name__ == "__main__":
  app.run(runtime.exit_on_user_error(main))
