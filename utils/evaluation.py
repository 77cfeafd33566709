"""Soft-nearest-neighbour evaluation of a trained encoder (METHOD.md section 7), for nn_eval.py and the notebook,
with the weighted k-NN and the linear probe of the same embeddings beside it."""

import warnings

from ml_collections import ConfigDict
import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
import tensorflow as tf
import tf_keras

from utils import losses
from utils.data import pipelines, sources
from utils.errors import UserError
from utils.model import encoder as encoder_lib
from utils.model import saved
from utils.workdir import Workdir

ENCODER_CHOICES = ("auto", "pretrained", "finetuned")


def encoder_directory(workdir: Workdir, choice: str = "auto") -> tuple[str, str, str]:
  """Which encoder of a workdir to evaluate: (choice, folder, the script that writes that folder).

  'auto' is the fine-tuned encoder when the workdir has one, else the pre-trained one.
  """
  if choice == "auto":
    choice = "finetuned" if encoder_lib.exists(workdir.finetuned.root) else "pretrained"
  if choice == "finetuned":
    return choice, workdir.finetuned.root, "fine_tune.py"
  return choice, workdir.encoder, "paws_train.py"


def load_float32_encoder(directory: str, config: ConfigDict, written_by: str) -> tf_keras.Model:
  """The saved encoder, built in float32 whatever precision it was trained in (saved.float32_policy)."""
  with saved.float32_policy():
    return encoder_lib.load_encoder(directory, config, written_by)[0]


def embed(encoder: tf_keras.Model, images, batch_size: int, mean, std) -> tf.Tensor:
  """The encoder's output z of images in batches (memory flat in len(images)).

  z is the prediction head's output when the model has one (the ImageNet preset), as the reference's ImageNet
  soft-NN evaluation (`snn_eval.py --use-pred`) embeds supports and queries; without a prediction head
  (cifar10, digits) z is the projection head's output h itself (METHOD.md section 7).
  `images`: uint8 [N, H, W, 3], or a tf.data.Dataset of normalised batches (streamed files, utils/data/sources.py).
  """
  batches = images if isinstance(images, tf.data.Dataset) else pipelines.eval_dataset(images, batch_size, mean, std)
  parts = [encoder(batch, training=False)[1] for batch in batches]
  return tf.cast(tf.concat(parts, axis=0), tf.float32)


def soft_nn_predict(
  support: tf.Tensor, support_labels, queries: tf.Tensor, num_classes: int, tau: float, batch_size: int
) -> np.ndarray:
  """SNN class probabilities of the queries, in batches of queries (one-hot support labels)."""
  one_hot = tf.one_hot(support_labels, num_classes)
  return tf.concat(
    [losses.snn(queries[i : i + batch_size], support, one_hot, tau) for i in range(0, len(queries), batch_size)], axis=0
  ).numpy()


def knn_predict(
  support: tf.Tensor,
  support_labels,
  queries: tf.Tensor,
  num_classes: int,
  k: int,
  temperature: float,
  batch_size: int,
) -> np.ndarray:
  """Weighted k-NN class scores of the queries [Q, num_classes], in batches of queries.

  Cosine similarity: supports and queries are L2-normalised. The k supports most similar to a query (all of
  them when k exceeds the support set) vote for their class with weight exp(similarity / temperature), and the
  votes are summed per class: the weighted k-NN of InstDisc (Wu et al. 2018) that DINO's eval_knn.py also uses,
  there with k = 20 and T = 0.07. The prediction is the argmax (a tie goes to the lower class index).
  """
  support = tf.math.l2_normalize(tf.cast(support, tf.float32), axis=1)
  queries = tf.math.l2_normalize(tf.cast(queries, tf.float32), axis=1)
  labels = tf.convert_to_tensor(np.asarray(support_labels, np.int64))
  k = min(int(k), int(support.shape[0]))
  scores = []
  for i in range(0, len(queries), batch_size):
    similarity = tf.matmul(queries[i : i + batch_size], support, transpose_b=True)
    nearest, indices = tf.math.top_k(similarity, k=k)
    votes = tf.one_hot(tf.gather(labels, indices), num_classes) * tf.exp(nearest / temperature)[..., None]
    scores.append(tf.reduce_sum(votes, axis=1))
  return tf.concat(scores, axis=0).numpy()


# The linear probe's logistic regression (linear_probe_predict).
LINEAR_PROBE_C = 1.0
LINEAR_PROBE_MAX_ITER = 1000


def normalise_rows(x) -> np.ndarray:
  """Rows of x scaled to unit L2 norm, float64 (a zero row stays zero)."""
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def linear_probe_predict(support, support_labels, queries) -> tuple[np.ndarray, int]:
  """Classes of the queries by a logistic regression fitted on the frozen embeddings of the supports.

  scikit-learn's LogisticRegression (multinomial, L-BFGS) on the L2-normalised embeddings, the geometry the
  soft-NN and k-NN evaluations compare in; the encoder is not touched.

  Regularisation: scikit-learn's default L2 penalty with C = 1.0, fixed. The labeled images are all there is
  (10 per class in the digits demo): choosing C by cross-validation on them would pick on folds of a few
  images each, and choosing it on the test set would report a tuned number; a fixed C keeps the probe one
  reproducible number, comparable across label seeds and runs. C weighs the summed loss, so the penalty is
  mild for 100 images (about 0.005 |W|^2 against the mean cross-entropy) and fades as the labeled set grows;
  on unit-norm inputs it also does not depend on the scale of the embeddings.

  max_iter = 1000: the probe's number should be that of the fitted optimum, not of where the solver stopped.
  The digits probe (100 x 128) converges in a few tens of L-BFGS iterations (14 here), far below
  scikit-learn's default of 100, but larger labeled sets (CIFAR-10's 4000, ImageNet's 128 116 images in
  1000 classes) can need more; 1000 bounds the time of a fit that does not converge, which is reported
  (returned iterations == LINEAR_PROBE_MAX_ITER; nn_eval.py prints a warning) instead of scikit-learn's
  ConvergenceWarning.

  Args:
    support: [N, D] support embeddings; support_labels: [N] int; queries: [Q, D] embeddings.
  Returns:
    (predicted labels [Q], L-BFGS iterations used).
  """
  support, queries = normalise_rows(support), normalise_rows(queries)
  support_labels = np.asarray(support_labels)
  classes = np.unique(support_labels)
  if len(classes) == 1:  # nothing to separate: every query gets the one class
    return np.full(len(queries), classes[0]), 0
  probe = LogisticRegression(C=LINEAR_PROBE_C, max_iter=LINEAR_PROBE_MAX_ITER)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ConvergenceWarning)  # reported through the iteration count instead
    probe.fit(support, support_labels)
  return probe.predict(queries), int(np.max(probe.n_iter_))


def evaluate(
  encoder: tf_keras.Model,
  data: ConfigDict,
  eval_config: ConfigDict,
  support_images,
  support_labels: np.ndarray,
  test_images,
  test_labels: np.ndarray,
) -> tuple[dict, np.ndarray, np.ndarray]:
  """Soft-NN top-1 of the test images with the labeled images as supports, and beside it the weighted k-NN
  (knn_predict) and linear-probe (linear_probe_predict) top-1 of the same embeddings, computed once.

  Args:
    encoder: a trained Encoder.
    data: the config's `data` section (mean, std).
    eval_config: the config's `eval` section (tau, batch_size; knn_k, 0 = no k-NN, knn_temperature;
      linear_probe).
    support_images, support_labels: the labeled training images (un-augmented) and their labels.
    test_images, test_labels: the queries.
  Returns:
    (metrics dict with top1 (soft-NN), per_class, num_support, num_test, then knn_top1, knn_k (the k used:
    at most the number of supports), knn_temperature, and linear_probe_top1, linear_probe_C,
    linear_probe_iterations, linear_probe_max_iter when they are on; test embeddings [N, D]; the soft-NN
    confusion matrix).
  """
  num_classes = int(max(support_labels.max(), test_labels.max())) + 1
  batch_size = eval_config.batch_size
  support = embed(encoder, support_images, batch_size, data.mean, data.std)
  queries = embed(encoder, test_images, batch_size, data.mean, data.std)
  predictions = soft_nn_predict(support, support_labels, queries, num_classes, eval_config.tau, batch_size).argmax(
    axis=1
  )
  confusion = np.zeros([num_classes, num_classes], dtype=np.int64)
  np.add.at(confusion, (test_labels, predictions), 1)
  per_class = 100.0 * np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
  metrics = {
    "top1": 100.0 * float(np.mean(predictions == test_labels)),
    "per_class": [round(float(x), 3) for x in per_class],
    "num_support": int(len(support_labels)),
    "num_test": int(len(test_labels)),
  }
  if eval_config.knn_k:
    scores = knn_predict(
      support, support_labels, queries, num_classes, eval_config.knn_k, eval_config.knn_temperature, batch_size
    )
    metrics.update(
      {
        "knn_top1": 100.0 * float(np.mean(scores.argmax(axis=1) == test_labels)),
        "knn_k": min(eval_config.knn_k, int(len(support_labels))),
        "knn_temperature": eval_config.knn_temperature,
      }
    )
  if eval_config.linear_probe:
    probed, iterations = linear_probe_predict(support.numpy(), support_labels, queries.numpy())
    metrics.update(
      {
        "linear_probe_top1": 100.0 * float(np.mean(probed == test_labels)),
        "linear_probe_C": LINEAR_PROBE_C,
        "linear_probe_iterations": iterations,
        "linear_probe_max_iter": LINEAR_PROBE_MAX_ITER,
      }
    )
  return metrics, queries.numpy(), confusion


def evaluation_images(source, data, batch_size):
  """(query batches or uint8 arrays, labels) of a Source's evaluation set for evaluate_classifier.

  Files: Resize + CenterCrop (pipelines.stream_eval_dataset with decoding.resize_centre_crop). Arrays (cifar10,
  digits): the whole images, as the soft-NN evaluation uses them.
  """
  if not source.streamed:
    return source.test_images, source.test_labels
  if source.evaluation is None:
    raise UserError(source.evaluation_hint)
  queries = pipelines.stream_eval_dataset(
    source.evaluation, np.arange(len(source.evaluation)), data, batch_size, sources.EVALUATION_TRANSFORM
  )
  return queries, source.evaluation.labels


def heldout_images(source, indices, data, batch_size):
  """(batches or uint8 arrays, labels) of the training images `indices` (fine_tune.py --heldout_split_file),
  prepared as evaluation_images prepares the queries: Resize + CenterCrop for files, whole arrays."""
  indices = np.asarray(indices, np.int64)
  labels = source.train_labels[indices]
  if not source.streamed:
    return source.train_images[indices], labels
  return pipelines.stream_eval_dataset(source.train, indices, data, batch_size, sources.EVALUATION_TRANSFORM), labels


def evaluate_classifier(model: tf_keras.Model, images, labels, batch_size: int = 256, mean=None, std=None) -> dict:
  """Top-1 and top-5 accuracy (%) of the classifier on the queries.

  Args:
    model: a Classifier.
    images: a tf.data.Dataset of normalised float batches (evaluation_images), or uint8 [N, H, W, 3]
      arrays used whole (then mean and std are required).
    labels: int [N].
  Returns:
    dict of top1, top5 (top-k with k = min(5, classes)) and num_test.
  """
  if not isinstance(images, tf.data.Dataset):
    if mean is None or std is None:
      raise ValueError("mean and std are required for image arrays")
    images = pipelines.eval_dataset(images, batch_size, mean, std)
  labels = np.asarray(labels, np.int64)
  k = min(5, model.num_classes)
  top1 = top5 = seen = 0
  for batch in images:
    logits = tf.cast(model(batch, training=False), tf.float32)
    expected = labels[seen : seen + len(logits)]
    best = tf.math.top_k(logits, k=k).indices.numpy()
    top1 += int(np.sum(best[:, 0] == expected))
    top5 += int(np.sum(np.any(best == expected[:, None], axis=1)))
    seen += len(logits)
  if seen != len(labels):
    raise ValueError(f"{seen} images for {len(labels)} labels")
  return {"top1": 100.0 * top1 / seen, "top5": 100.0 * top5 / seen, "top_k": k, "num_test": seen}
