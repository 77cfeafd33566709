"""PAWS and SuNCEt losses (METHOD.md section 2).

Every function casts its inputs to float32 first, so embeddings coming out of a
mixed-precision model (float16 / bfloat16) are handled, and returns float32.
Nothing here branches on tensor values in Python, so all of it compiles under
`tf.function(jit_compile=True)`.
"""

from typing import NamedTuple

import tensorflow as tf

# log(p) is evaluated as log(max(p, LOG_FLOOR)): p can underflow to exactly 0
# with one-hot labels and a small tau, and 0 * log(0) would be NaN. The floor
# sits far below any probability the losses meet at tau = 0.1 (about 1e-12).
LOG_FLOOR = 1e-20


# METHOD.md section 2: target entries below this are set to 0.
TARGET_ZERO_THRESHOLD = 1e-4


def _safe_log(x):
  return tf.math.log(tf.maximum(x, LOG_FLOOR))


def sharpen(p: tf.Tensor, T: float) -> tf.Tensor:
  """Sharpens distributions along the last axis (METHOD.md section 2).

  sharpen(p)_k = p_k^(1/T) / sum_j p_j^(1/T).

  Args:
    p: probabilities [..., K], any float dtype.
    T: temperature; T < 1 makes the distribution peakier.

  Returns:
    float32 tensor shaped like `p`.
  """
  powered = tf.pow(tf.cast(p, tf.float32), 1.0 / T)
  return powered / tf.reduce_sum(powered, axis=-1, keepdims=True)


def snn(query: tf.Tensor, supports: tf.Tensor, support_labels: tf.Tensor, tau: float) -> tf.Tensor:
  """Soft nearest-neighbour class probabilities (METHOD.md section 2).

  snn(q, S, Y) = softmax(q . S^T / tau) . Y with q and S L2-normalised and the
  softmax taken over individual support rows (not class means).

  Args:
    query: embeddings [Nq, D].
    supports: support embeddings [Ns, D].
    support_labels: (possibly smoothed) label rows [Ns, K].
    tau: softmax temperature.

  Returns:
    float32 class probabilities [Nq, K].
  """
  query = tf.math.l2_normalize(tf.cast(query, tf.float32), axis=-1)
  supports = tf.math.l2_normalize(tf.cast(supports, tf.float32), axis=-1)
  support_labels = tf.cast(support_labels, tf.float32)
  weights = tf.nn.softmax(tf.matmul(query, supports, transpose_b=True) / tau, axis=-1)
  return tf.matmul(weights, support_labels)


def support_labels(
  num_classes: int,
  images_per_class: int,
  views: int = 1,
  num_replicas: int = 1,
  smoothing: float = 0.0,
  unique_classes: bool = False,
) -> tf.Tensor:
  """Label rows of the gathered support batch (METHOD.md section 2), as utils/data/sampling.py lays it out.

  One device's support batch is K * images_per_class rows interleaved by class (row i has class i mod K).
  Replica r holds rows r*n .. r*n + n - 1 of it, n = K * images_per_class / R, in each of its `views`
  augmented views; gathered, the rows are [replica, view, row]. With unique_classes each replica draws its
  own K classes (n is then a multiple of K): replica r's classes are columns r*K .. r*K + K - 1 of R*K.
  Smoothing eps gives the on-value 1 - eps + eps / C and the off-value eps / C over the C columns.

  Args:
    num_classes: K, classes per batch (per replica with unique_classes).
    images_per_class: support images per class over all replicas.
    views: augmented views of each support image.
    num_replicas: R, replicas the batch is split between.
    smoothing: label smoothing eps.
    unique_classes: whether each replica has its own classes.

  Returns:
    float32 tensor [K * images_per_class * views, C], C = K, or R * K with unique_classes.
  """
  rows = num_classes * images_per_class // num_replicas
  replica = tf.range(num_replicas)[:, None, None]
  positions = replica * rows + tf.range(rows)[None, None, :]  # row in the one-device batch
  classes = tf.broadcast_to(positions % num_classes, [num_replicas, views, rows])
  num_columns = num_classes
  if unique_classes:
    classes += replica * num_classes
    num_columns *= num_replicas
  off_value = smoothing / num_columns
  on_value = 1.0 - smoothing + off_value
  return tf.one_hot(tf.reshape(classes, [-1]), num_columns, on_value=on_value, off_value=off_value, dtype=tf.float32)


def _mean_across_replicas(value):
  """All-reduce mean over replicas; identity with a single replica."""
  context = tf.distribute.get_replica_context()
  # None means cross-replica context: the caller runs the loss outside
  # strategy.run, i.e. on the whole batch, so there is nothing to average.
  if context is None or context.num_replicas_in_sync == 1:
    return value
  return context.all_reduce("MEAN", value)


class SnnInputs(NamedTuple):
  """One side of the PAWS loss: the view embeddings classified and the support set classifying them."""

  views: tf.Tensor  # [rows, D]
  supports: tf.Tensor  # [Ns, D] support embeddings
  support_labels: tf.Tensor  # [Ns, K] their label rows (support_labels)


def paws_loss(
  anchors: SnnInputs, targets: SnnInputs, tau: float = 0.1, T: float = 0.25, multicrop: int = 6, me_max: bool = True
) -> tuple[tf.Tensor, tf.Tensor]:
  """PAWS cross-entropy and me-max terms (METHOD.md section 2).

  p = snn(anchors.views, anchors.supports, Y_a, tau) with gradient;
  t = sharpen(snn(targets.views, targets.supports, Y_t, tau), T) without
  gradient; small-crop targets are 0.5 (t_view1 + t_view2) repeated multicrop
  times; target entries below 1e-4 are set to 0.
  CE = mean_rows sum_k -t_k log p_k.
  me-max = sum_k pbar_k log pbar_k with pbar = mean_rows sharpen(p, T), with
  gradient, averaged across replicas when there are several.

  Args:
    anchors: views [(2 + multicrop) * B, D] (rows: all large-1, all large-2, then small crop
      1..multicrop, blocks of B), with the supports [Ns, D] and label rows [Ns, K] that classify them.
    targets: views [2B, D], the large-view embeddings already swapped by the caller so that they align
      with the first 2B anchor rows, with their supports [Ns', D] and label rows [Ns', K].
    tau: SNN temperature.
    T: sharpening temperature.
    multicrop: number of small crops per image.
    me_max: whether to compute the me-max term (else it is 0).

  Returns:
    (ce, me_max_term): two float32 scalars; their sum is the loss (floor -log K).
  """
  anchor_views, anchor_supports, anchor_support_labels = anchors
  target_views, target_supports, target_support_labels = targets
  anchor_rows = anchor_views.shape[0]
  target_rows = target_views.shape[0]
  if anchor_rows is not None and target_rows is not None and anchor_rows * 2 != target_rows * (2 + multicrop):
    raise ValueError(
      f"anchor_views has {anchor_rows} rows and target_views {target_rows};"
      f" expected (2 + multicrop) * B and 2B with multicrop={multicrop}."
    )

  probabilities = snn(anchor_views, anchor_supports, anchor_support_labels, tau)

  targets = sharpen(
    snn(
      tf.stop_gradient(target_views), tf.stop_gradient(target_supports), tf.stop_gradient(target_support_labels), tau
    ),
    T,
  )
  if multicrop > 0:
    batch_size = tf.shape(targets)[0] // 2
    small_crop_targets = 0.5 * (targets[:batch_size] + targets[batch_size:])
    targets = tf.concat([targets, tf.tile(small_crop_targets, [multicrop, 1])], axis=0)
  targets = tf.where(targets < TARGET_ZERO_THRESHOLD, tf.zeros_like(targets), targets)
  targets = tf.stop_gradient(targets)

  ce = tf.reduce_mean(tf.reduce_sum(-targets * _safe_log(probabilities), axis=-1))

  if me_max:
    mean_sharpened = tf.reduce_mean(sharpen(probabilities, T), axis=0)
    mean_sharpened = _mean_across_replicas(mean_sharpened)
    me_max_term = tf.reduce_sum(mean_sharpened * _safe_log(mean_sharpened))
  else:
    me_max_term = tf.constant(0.0, tf.float32)
  return ce, me_max_term


def suncet_loss(z: tf.Tensor, labels: tf.Tensor, tau: float = 0.1) -> tf.Tensor:
  """SuNCEt loss: SNN over the other labelled embeddings (METHOD.md section 2).

  Each row i is classified by softmax_{j != i}(z_i . z_j / tau) . Y with z
  L2-normalised; loss = mean_i sum_k -Y_ik log probs_ik.

  Args:
    z: embeddings [N, D].
    labels: one-hot labels [N, K].
    tau: softmax temperature.

  Returns:
    float32 scalar.
  """
  z = tf.math.l2_normalize(tf.cast(z, tf.float32), axis=-1)
  labels = tf.cast(labels, tf.float32)
  logits = tf.matmul(z, z, transpose_b=True) / tau
  # A large finite offset (not -inf) removes self-similarity from the softmax
  # without risking inf - inf in the gradient.
  logits -= 1e9 * tf.eye(tf.shape(z)[0], dtype=tf.float32)
  probabilities = tf.matmul(tf.nn.softmax(logits, axis=-1), labels)
  return tf.reduce_mean(tf.reduce_sum(-labels * _safe_log(probabilities), axis=-1))
