"""The weighted k-NN and the linear probe beside soft-NN (utils/evaluation.py), on tiny data against NumPy and
scikit-learn oracles written here; nn_eval.py's eval.json fields are checked by tests/test_scripts.py."""

import math

import ml_collections
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
import tensorflow as tf

from utils import evaluation


def numpy_knn(support, labels, queries, num_classes, k, temperature):
  """The InstDisc / DINO weighted k-NN, one query at a time: cosine similarities, the k largest (all supports
  when k is larger), votes exp(similarity / T) summed per class."""
  support = support / np.linalg.norm(support, axis=1, keepdims=True)
  queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
  scores = np.zeros([len(queries), num_classes])
  for q, query in enumerate(queries):
    similarity = support @ query
    for i in np.argsort(-similarity, kind="stable")[:k]:
      scores[q, labels[i]] += np.exp(similarity[i] / temperature)
  return scores


def clusters(seed, per_class, num_classes=3, dim=8, spread=0.8):
  """Gaussian clusters around class centres that are the same for every seed: (embeddings [N, D] float32,
  labels [N]); the seed draws the points."""
  centres = np.random.default_rng(1234).normal(size=[num_classes, dim])
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(num_classes), per_class)
  return (centres[labels] + spread * rng.normal(size=[len(labels), dim])).astype(np.float32), labels


# --- k-NN --------------------------------------------------------------------------------------------------

# Three supports in two classes; the query (1, 0) has cosine similarities 1.0, 0.6 and 0.0 to them (the first
# is not unit-length: cosine, not dot product).
SUPPORT = np.array([[3.0, 0.0], [0.6, 0.8], [0.0, 2.0]], np.float32)
SUPPORT_LABELS = np.array([0, 1, 1])
QUERY = np.array([[1.0, 0.0]], np.float32)


@pytest.mark.parametrize(
  "k,temperature,expected",
  [
    (1, 0.5, [math.exp(2.0), 0.0]),
    (2, 0.5, [math.exp(2.0), math.exp(1.2)]),
    (3, 0.5, [math.exp(2.0), math.exp(1.2) + 1.0]),  # 7.39 against 4.32: the one close support wins
    (3, 10.0, [math.exp(0.1), math.exp(0.06) + 1.0]),  # 1.11 against 2.06: near-uniform weights, the majority wins
    (20, 0.5, [math.exp(2.0), math.exp(1.2) + 1.0]),  # k above the 3 supports: all of them vote
  ],
)
def test_knn_by_hand(k, temperature, expected):
  scores = evaluation.knn_predict(SUPPORT, SUPPORT_LABELS, QUERY, 2, k, temperature, batch_size=4)
  np.testing.assert_allclose(scores, [expected], rtol=1e-5)


def test_knn_weights_decide_against_the_majority_at_low_temperature():
  assert evaluation.knn_predict(SUPPORT, SUPPORT_LABELS, QUERY, 2, 3, 0.5, 4).argmax(axis=1) == [0]
  assert evaluation.knn_predict(SUPPORT, SUPPORT_LABELS, QUERY, 2, 3, 10.0, 4).argmax(axis=1) == [1]


@pytest.mark.parametrize("k", [1, 5, 20, 30, 1000])  # 30 supports: k = 30 and k = 1000 both use them all
@pytest.mark.parametrize("temperature", [0.07, 1.0])
def test_knn_matches_numpy(k, temperature):
  support, labels = clusters(0, per_class=10)
  queries, _ = clusters(1, per_class=7)
  scores = evaluation.knn_predict(support, labels, queries, 3, k, temperature, batch_size=8)  # 3 batches of queries
  expected = numpy_knn(support.astype(np.float64), labels, queries.astype(np.float64), 3, k, temperature)
  np.testing.assert_allclose(scores, expected, rtol=1e-4)
  np.testing.assert_array_equal(scores.argmax(axis=1), expected.argmax(axis=1))


def test_knn_with_k_above_the_supports_equals_k_equal_to_them():
  support, labels = clusters(2, per_class=2)
  queries, _ = clusters(3, per_class=4)
  everything = evaluation.knn_predict(support, labels, queries, 3, 6, 0.07, 5)
  np.testing.assert_array_equal(evaluation.knn_predict(support, labels, queries, 3, 50, 0.07, 5), everything)
  np.testing.assert_allclose(everything, numpy_knn(support, labels, queries, 3, 6, 0.07), rtol=1e-4)


def test_knn_over_all_supports_at_tau_is_soft_nn_unnormalised():
  # soft-NN = softmax(similarities / tau) . one-hot labels: the k-NN votes with k = all supports and T = tau,
  # divided by their sum (METHOD.md section 2): the same prediction.
  support, labels = clusters(11, per_class=6, spread=1.5)
  queries, _ = clusters(12, per_class=9, spread=1.5)
  votes = evaluation.knn_predict(support, labels, queries, 3, len(support), 0.1, 10)
  soft_nn = evaluation.soft_nn_predict(tf.constant(support), labels, tf.constant(queries), 3, 0.1, 10)
  np.testing.assert_allclose(votes / votes.sum(axis=1, keepdims=True), soft_nn, rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(votes.argmax(axis=1), soft_nn.argmax(axis=1))


def test_knn_takes_tensors_and_counts_classes_without_supports():
  support, labels = clusters(4, per_class=3)
  queries, _ = clusters(5, per_class=2)
  scores = evaluation.knn_predict(tf.constant(support), labels, tf.constant(queries), 5, 4, 0.07, 100)
  assert scores.shape == (6, 5)
  assert np.all(scores[:, 3:] == 0)  # classes 3 and 4 have no support: no votes


# --- Linear probe ----------------------------------------------------------------------------------------


def test_linear_probe_matches_logistic_regression_fitted_here():
  support, labels = clusters(6, per_class=10, spread=1.5)  # overlapping: not every query is easy
  queries, query_labels = clusters(7, per_class=50, spread=1.5)
  predicted, iterations = evaluation.linear_probe_predict(support, labels, queries)

  def unit(x):
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)

  oracle = LogisticRegression(C=1.0, max_iter=1000).fit(unit(support), labels)
  np.testing.assert_array_equal(predicted, oracle.predict(unit(queries)))
  assert iterations == int(oracle.n_iter_.max()) < evaluation.LINEAR_PROBE_MAX_ITER
  accuracy = np.mean(predicted == query_labels)
  assert accuracy == np.mean(oracle.predict(unit(queries)) == query_labels)
  assert 1 / 3 < accuracy < 1.0  # learnt something, and the data are not trivially separable


def test_linear_probe_sees_directions_only():
  support, labels = clusters(8, per_class=6)
  queries, _ = clusters(9, per_class=6)
  scale = np.random.default_rng(0).uniform(0.1, 10.0, size=[len(support), 1]).astype(np.float32)
  np.testing.assert_array_equal(
    evaluation.linear_probe_predict(support * scale, labels, queries * 3.0)[0],
    evaluation.linear_probe_predict(support, labels, queries)[0],
  )


def test_linear_probe_with_one_class_predicts_it():
  predicted, iterations = evaluation.linear_probe_predict(np.ones([3, 4]), np.array([2, 2, 2]), np.ones([5, 4]))
  np.testing.assert_array_equal(predicted, [2] * 5)
  assert iterations == 0


# --- evaluation.evaluate: the three on the same embeddings -----------------------------------------------------


class Flatten(tf.Module):
  """A stand-in encoder: both outputs are the flattened normalised image."""

  def __call__(self, images, training=False):
    flat = tf.reshape(images, [tf.shape(images)[0], -1])
    return flat, flat


def eval_config(**changes):
  config = ml_collections.ConfigDict(
    {"tau": 0.1, "batch_size": 7, "knn_k": 20, "knn_temperature": 0.07, "linear_probe": True}
  )
  config.update(changes)
  return config


def test_evaluate_reports_knn_and_linear_probe_of_the_soft_nn_embeddings():
  rng = np.random.default_rng(10)
  prototypes = rng.integers(0, 256, size=[3, 2, 2, 3])
  support_labels, test_labels = np.repeat(np.arange(3), 5), np.repeat(np.arange(3), 12)
  support_images, test_images = (
    np.clip(prototypes[labels] + rng.integers(-60, 60, size=[len(labels), 2, 2, 3]), 0, 255).astype(np.uint8)
    for labels in (support_labels, test_labels)
  )
  data = ml_collections.ConfigDict({"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)})
  encoder = Flatten()

  metrics, queries, _ = evaluation.evaluate(
    encoder, data, eval_config(), support_images, support_labels, test_images, test_labels
  )
  support = evaluation.embed(encoder, support_images, 7, data.mean, data.std).numpy()
  np.testing.assert_allclose(queries, evaluation.embed(encoder, test_images, 7, data.mean, data.std).numpy())
  knn = numpy_knn(support, support_labels, queries, 3, 15, 0.07).argmax(axis=1)
  probe = LogisticRegression(C=1.0, max_iter=1000).fit(evaluation.normalise_rows(support), support_labels)
  assert metrics["knn_top1"] == pytest.approx(100 * np.mean(knn == test_labels))
  assert metrics["linear_probe_top1"] == pytest.approx(
    100 * np.mean(probe.predict(evaluation.normalise_rows(queries)) == test_labels)
  )
  assert metrics["knn_k"] == 15  # k = 20 asked, 15 supports
  assert metrics["knn_temperature"] == 0.07
  assert metrics["linear_probe_C"] == 1.0 and metrics["linear_probe_max_iter"] == 1000
  assert 0 < metrics["linear_probe_iterations"] < 1000

  off, *_ = evaluation.evaluate(
    encoder, data, eval_config(knn_k=0, linear_probe=False), support_images, support_labels, test_images, test_labels
  )
  assert not any(key.startswith(("knn", "linear_probe")) for key in off)
  assert off["top1"] == metrics["top1"]
