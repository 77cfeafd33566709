"""Tests for utils/losses.py against NumPy versions of the METHOD.md section 2 formulas."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from utils import losses

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_FLOOR = 1e-20  # same guard as the module, so log(0) cannot differ


# ---- NumPy references, written from METHOD.md section 2 (float64) ----


def numpy_sharpen(p, T):
  powered = p ** (1.0 / T)
  return powered / powered.sum(axis=-1, keepdims=True)


def numpy_normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_softmax(logits):
  logits = logits - logits.max(axis=-1, keepdims=True)
  exponentials = np.exp(logits)
  return exponentials / exponentials.sum(axis=-1, keepdims=True)


def numpy_snn(query, supports, labels, tau):
  logits = numpy_normalize(query) @ numpy_normalize(supports).T / tau
  return numpy_softmax(logits) @ labels


def numpy_labels(num_classes, images_per_class, num_views, smoothing):
  rows = num_views * num_classes * images_per_class
  labels = np.full((rows, num_classes), smoothing / num_classes)
  labels[np.arange(rows), np.arange(rows) % num_classes] = 1.0 - smoothing + smoothing / num_classes
  return labels


def numpy_targets(target_views, target_supports, target_labels, tau, T, multicrop, zero_small=True):
  targets = numpy_sharpen(numpy_snn(target_views, target_supports, target_labels, tau), T)
  if multicrop > 0:
    batch = targets.shape[0] // 2
    small = 0.5 * (targets[:batch] + targets[batch:])
    targets = np.concatenate([targets] + [small] * multicrop, axis=0)
  if zero_small:
    targets = np.where(targets < 1e-4, 0.0, targets)
  return targets


def numpy_paws(anchors, targets, tau, T, multicrop, zero_small=True):
  """anchors, targets: (views, supports, label rows) of each side, as losses.SnnInputs."""
  probabilities = numpy_snn(*anchors, tau)
  targets = numpy_targets(*targets, tau, T, multicrop, zero_small)
  ce = np.mean(np.sum(-targets * np.log(np.maximum(probabilities, LOG_FLOOR)), axis=1))
  mean_sharpened = numpy_sharpen(probabilities, T).mean(axis=0)
  me_max = np.sum(mean_sharpened * np.log(mean_sharpened))
  return ce, me_max


def numpy_suncet(z, labels, tau):
  logits = numpy_normalize(z) @ numpy_normalize(z).T / tau
  exponentials = np.exp(logits) * (1.0 - np.eye(len(z)))
  weights = exponentials / exponentials.sum(axis=1, keepdims=True)
  return np.mean(np.sum(-labels * np.log(weights @ labels), axis=1))


# ---- inputs ----


def make_inputs(
  seed, batch_size=4, multicrop=6, num_classes=5, images_per_class=3, num_views=2, dimension=16, smoothing=0.1
):
  """Random PAWS inputs as float32 NumPy arrays, in paws_loss argument order."""
  generator = np.random.default_rng(seed)
  num_supports = num_views * num_classes * images_per_class
  labels = numpy_labels(num_classes, images_per_class, num_views, smoothing)
  return [
    generator.normal(size=((2 + multicrop) * batch_size, dimension)),
    generator.normal(size=(num_supports, dimension)),
    labels,
    generator.normal(size=(2 * batch_size, dimension)),
    generator.normal(size=(num_supports, dimension)),
    labels,
  ]


def sides(inputs):
  """paws_loss's two arguments from the six arrays of make_inputs."""
  return losses.SnnInputs(*inputs[:3]), losses.SnnInputs(*inputs[3:])


def as_float32(arrays):
  return [np.asarray(array, np.float32) for array in arrays]


# ---- sharpen, snn, labels ----


def test_sharpen_matches_numpy():
  p = numpy_softmax(np.random.default_rng(0).normal(size=(6, 7)))
  for T in (0.25, 1.0, 2.0):
    result = losses.sharpen(tf.constant(p, tf.float32), T)
    assert result.dtype == tf.float32
    np.testing.assert_allclose(result.numpy(), numpy_sharpen(p, T), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(losses.sharpen(p.astype(np.float32), 1.0).numpy(), p, rtol=1e-5)


def test_snn_matches_numpy():
  generator = np.random.default_rng(1)
  query = generator.normal(size=(7, 16))
  supports = generator.normal(size=(30, 16))
  labels = numpy_labels(5, 3, 2, 0.1)
  for tau in (0.1, 0.5):
    result = losses.snn(*as_float32([query, supports, labels]), tau)
    assert result.shape == (7, 5)
    np.testing.assert_allclose(result.numpy(), numpy_snn(query, supports, labels, tau), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.numpy().sum(axis=1), 1.0, rtol=1e-5)


def test_snn_ignores_embedding_scale():
  generator = np.random.default_rng(2)
  query, supports = as_float32([generator.normal(size=(3, 8)), generator.normal(size=(10, 8))])
  labels = numpy_labels(2, 5, 1, 0.0).astype(np.float32)
  np.testing.assert_allclose(
    losses.snn(query * 7.0, supports * 0.1, labels, 0.1).numpy(),
    losses.snn(query, supports, labels, 0.1).numpy(),
    rtol=1e-5,
  )


def test_support_labels_smoothing_and_interleaving():
  labels = losses.support_labels(10, 4, views=2, smoothing=0.1)
  assert labels.dtype == tf.float32
  assert labels.shape == (80, 10)
  labels = labels.numpy()
  np.testing.assert_allclose(labels, numpy_labels(10, 4, 2, 0.1), rtol=1e-6)
  np.testing.assert_array_equal(labels.argmax(axis=1), np.arange(80) % 10)
  np.testing.assert_allclose(labels.max(axis=1), 0.91, rtol=1e-6)
  np.testing.assert_allclose(np.sort(labels, axis=1)[:, :-1], 0.01, rtol=1e-6)
  np.testing.assert_allclose(labels.sum(axis=1), 1.0, rtol=1e-6)
  # One block per view: the second view repeats the first.
  np.testing.assert_array_equal(labels[:40], labels[40:])


def test_support_labels_one_hot_default():
  labels = losses.support_labels(3, 2).numpy()
  np.testing.assert_array_equal(labels, np.eye(3)[[0, 1, 2, 0, 1, 2]])


def test_support_labels_of_rows_split_between_replicas():
  """3 images of 2 classes over 2 replicas: replica 0 holds rows 0-2 (classes 0 1 0), replica 1 rows 3-5
  (1 0 1), each in both views; gathered, the rows are [replica, view, row]."""
  labels = losses.support_labels(2, 3, views=2, num_replicas=2).numpy()
  classes = [0, 1, 0] * 2 + [1, 0, 1] * 2
  np.testing.assert_array_equal(labels, np.eye(2)[classes])
  # The same rows as one device's [view, row] batch, reordered: each class has 3 rows per view.
  np.testing.assert_array_equal(labels.sum(axis=0), [6, 6])


def test_support_labels_unique_classes():
  """Each replica has its own classes: replica r's row i has class r*K + i mod K of R*K, smoothed over R*K."""
  # 2 classes per replica, 3 replicas x 1 image per class, 2 views
  labels = losses.support_labels(2, 3, views=2, num_replicas=3, smoothing=0.3, unique_classes=True).numpy()
  classes = [0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5]
  expected = np.full([12, 6], 0.3 / 6) + (1 - 0.3) * np.eye(6)[classes]
  np.testing.assert_allclose(labels, expected, rtol=1e-6)
  shared = losses.support_labels(2, 3, views=2, num_replicas=3).numpy()  # without: every block the same 2 classes
  np.testing.assert_array_equal(shared, np.eye(2)[[0, 1] * 6])


# ---- paws_loss ----


@pytest.mark.parametrize("multicrop", [0, 2, 6])
def test_paws_loss_matches_numpy(multicrop):
  inputs = make_inputs(seed=3 + multicrop, multicrop=multicrop)
  ce, me_max = losses.paws_loss(*sides(as_float32(inputs)), multicrop=multicrop)
  expected_ce, expected_me_max = numpy_paws(inputs[:3], inputs[3:], tau=0.1, T=0.25, multicrop=multicrop)
  assert ce.dtype == tf.float32 and me_max.dtype == tf.float32
  assert ce.shape == () and me_max.shape == ()
  np.testing.assert_allclose(ce.numpy(), expected_ce, rtol=1e-5)
  np.testing.assert_allclose(me_max.numpy(), expected_me_max, rtol=1e-5)


def test_paws_loss_zeroes_tiny_targets():
  # Anchors near the first (class 0) support and one-hot labels give a tiny
  # log-loss on class 0 and large -log p elsewhere; targets near the same
  # support are peaked on class 0 with many entries in (0, 1e-4). The
  # zeroed entries then carry about 1 % of the CE.
  inputs = make_inputs(seed=0, multicrop=2, smoothing=0.0)
  generator = np.random.default_rng(100)
  inputs[0] = inputs[1][0] + 0.3 * generator.normal(size=inputs[0].shape)
  inputs[3] = inputs[4][0] + 0.3 * generator.normal(size=inputs[3].shape)
  targets = numpy_targets(*inputs[3:], 0.1, 0.25, multicrop=2, zero_small=False)
  assert np.any((targets > 1e-12) & (targets < 1e-4))
  ce, _ = losses.paws_loss(*sides(as_float32(inputs)), multicrop=2)
  expected_ce, _ = numpy_paws(inputs[:3], inputs[3:], tau=0.1, T=0.25, multicrop=2)
  unzeroed_ce, _ = numpy_paws(inputs[:3], inputs[3:], tau=0.1, T=0.25, multicrop=2, zero_small=False)
  assert abs(unzeroed_ce - expected_ce) > 20 * 1e-4 * expected_ce
  np.testing.assert_allclose(ce.numpy(), expected_ce, rtol=1e-4)


def test_paws_loss_small_crop_targets_are_mean_of_large_targets():
  # Placing every small-crop anchor on one large view makes the CE of the
  # small-crop rows checkable by hand from the large-view targets.
  batch_size, multicrop = 3, 2
  inputs = make_inputs(seed=11, batch_size=batch_size, multicrop=multicrop)
  anchor_views, anchor_supports, labels, target_views, target_supports, _ = inputs
  anchor_views[2 * batch_size :] = np.tile(anchor_views[:batch_size], (multicrop, 1))
  ce, _ = losses.paws_loss(*sides(as_float32(inputs)), multicrop=multicrop)

  probabilities = numpy_snn(anchor_views, anchor_supports, labels, 0.1)
  targets = numpy_sharpen(numpy_snn(target_views, target_supports, labels, 0.1), 0.25)
  # Averaged before the zeroing of tiny entries, as METHOD.md section 2 orders it.
  small_targets = 0.5 * (targets[:batch_size] + targets[batch_size:])
  targets = np.where(targets < 1e-4, 0.0, targets)
  small_targets = np.where(small_targets < 1e-4, 0.0, small_targets)
  log_p = np.log(probabilities)
  large_terms = np.sum(-targets * log_p[: 2 * batch_size], axis=1)
  small_terms = np.sum(-small_targets * log_p[:batch_size], axis=1)
  expected = (large_terms.sum() + multicrop * small_terms.sum()) / ((2 + multicrop) * batch_size)
  np.testing.assert_allclose(ce.numpy(), expected, rtol=1e-5)


def test_me_max_term_is_negative_entropy_of_mean_sharpened_prediction():
  inputs = make_inputs(seed=12, multicrop=2)
  _, me_max = losses.paws_loss(*sides(as_float32(inputs)), multicrop=2)
  probabilities = numpy_snn(*inputs[:3], 0.1)
  mean_sharpened = numpy_sharpen(probabilities, 0.25).mean(axis=0)
  entropy = -np.sum(mean_sharpened * np.log(mean_sharpened))
  assert me_max.numpy() <= 0.0
  assert me_max.numpy() >= -np.log(5) - 1e-6
  np.testing.assert_allclose(me_max.numpy(), -entropy, rtol=1e-5)


def test_me_max_false_gives_zero_and_same_ce():
  inputs = as_float32(make_inputs(seed=13, multicrop=2))
  ce_with, _ = losses.paws_loss(*sides(inputs), multicrop=2, me_max=True)
  ce_without, me_max = losses.paws_loss(*sides(inputs), multicrop=2, me_max=False)
  assert me_max.dtype == tf.float32
  assert me_max.numpy() == 0.0
  assert ce_without.numpy() == ce_with.numpy()


def test_paws_loss_rejects_mismatched_row_counts():
  inputs = as_float32(make_inputs(seed=14, multicrop=2))
  with pytest.raises(ValueError, match="multicrop"):
    losses.paws_loss(*sides(inputs), multicrop=6)


def test_paws_loss_gradients_flow_into_anchors_only():
  variables = [tf.Variable(array) for array in as_float32(make_inputs(seed=15, multicrop=2))]
  with tf.GradientTape() as tape:
    ce, me_max = losses.paws_loss(*sides(variables), multicrop=2)
    loss = ce + me_max
  gradients = tape.gradient(loss, variables)
  anchor_views, anchor_supports, _, target_views, target_supports, _ = gradients
  for gradient in (target_views, target_supports):
    assert gradient is None or not np.any(gradient.numpy())
  for gradient in (anchor_views, anchor_supports):
    assert gradient is not None and np.all(np.isfinite(gradient.numpy()))
    # Every anchor row and every support row takes part in the loss.
    assert np.all(np.abs(gradient.numpy()).sum(axis=1) > 0)


def test_me_max_term_has_gradient():
  variables = [tf.Variable(array) for array in as_float32(make_inputs(seed=16, multicrop=2))]
  with tf.GradientTape() as tape:
    _, me_max = losses.paws_loss(*sides(variables), multicrop=2)
  anchor_gradient = tape.gradient(me_max, variables[0])
  assert anchor_gradient is not None and np.any(anchor_gradient.numpy())


# ---- mixed precision and XLA ----


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_low_precision_inputs_give_float32_outputs(dtype):
  inputs = as_float32(make_inputs(seed=17, multicrop=2))
  low = [tf.cast(array, dtype) for array in inputs]
  # The same rounded values given as float32: the loss works in float32, so
  # the only difference from the float32 result is the input rounding.
  rounded = [tf.cast(array, tf.float32) for array in low]
  ce, me_max = losses.paws_loss(*sides(low), multicrop=2)
  ce_rounded, me_max_rounded = losses.paws_loss(*sides(rounded), multicrop=2)
  ce_exact, me_max_exact = losses.paws_loss(*sides(inputs), multicrop=2)
  assert ce.dtype == tf.float32 and me_max.dtype == tf.float32
  np.testing.assert_allclose(ce.numpy(), ce_rounded.numpy(), rtol=1e-6)
  np.testing.assert_allclose(me_max.numpy(), me_max_rounded.numpy(), rtol=1e-6)
  np.testing.assert_allclose(ce.numpy(), ce_exact.numpy(), rtol=5e-2)
  np.testing.assert_allclose(me_max.numpy(), me_max_exact.numpy(), rtol=5e-2)

  assert losses.sharpen(low[2], 0.25).dtype == tf.float32
  assert losses.snn(low[0], low[1], low[2], 0.1).dtype == tf.float32
  one_hot = tf.cast(np.eye(5)[np.arange(30) % 5], dtype)
  suncet = losses.suncet_loss(low[1], one_hot)
  assert suncet.dtype == tf.float32
  np.testing.assert_allclose(
    suncet.numpy(), losses.suncet_loss(inputs[1], np.eye(5, dtype=np.float32)[np.arange(30) % 5]).numpy(), rtol=5e-2
  )


def test_xla_matches_eager():
  inputs = as_float32(make_inputs(seed=18, multicrop=2))
  labels = np.eye(5, dtype=np.float32)[np.arange(30) % 5]

  @tf.function(jit_compile=True)
  def compiled(
    anchor_views, anchor_supports, anchor_labels, target_views, target_supports, target_labels, suncet_labels
  ):
    with tf.GradientTape() as tape:
      tape.watch([anchor_views, anchor_supports])
      ce, me_max = losses.paws_loss(
        losses.SnnInputs(anchor_views, anchor_supports, anchor_labels),
        losses.SnnInputs(target_views, target_supports, target_labels),
        multicrop=2,
      )
      loss = ce + me_max
    gradient = tape.gradient(loss, anchor_views)
    suncet = losses.suncet_loss(tf.cast(anchor_supports, tf.bfloat16), suncet_labels)
    return ce, me_max, gradient, suncet

  tensors = [tf.constant(array) for array in inputs]
  ce, me_max, gradient, suncet = compiled(*tensors, tf.constant(labels))
  with tf.GradientTape() as tape:
    tape.watch(tensors[0])
    eager_ce, eager_me_max = losses.paws_loss(*sides(tensors), multicrop=2)
    eager_loss = eager_ce + eager_me_max
  eager_gradient = tape.gradient(eager_loss, tensors[0])
  eager_suncet = losses.suncet_loss(tf.cast(tensors[1], tf.bfloat16), labels)
  np.testing.assert_allclose(ce.numpy(), eager_ce.numpy(), rtol=1e-5)
  np.testing.assert_allclose(me_max.numpy(), eager_me_max.numpy(), rtol=1e-5)
  np.testing.assert_allclose(gradient.numpy(), eager_gradient.numpy(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(suncet.numpy(), eager_suncet.numpy(), rtol=1e-5)


# ---- suncet_loss ----


def test_suncet_loss_matches_numpy():
  generator = np.random.default_rng(19)
  z = generator.normal(size=(20, 16))
  labels = np.eye(4)[generator.integers(0, 4, size=20)]
  for tau in (0.1, 0.5):
    result = losses.suncet_loss(*as_float32([z, labels]), tau=tau)
    assert result.dtype == tf.float32 and result.shape == ()
    np.testing.assert_allclose(result.numpy(), numpy_suncet(z, labels, tau), rtol=1e-5)


def test_suncet_loss_excludes_self():
  # Two classes, two points each; every point's same-class partner points the
  # opposite way, so with self excluded each point is closest to the other
  # class. Counting self-similarity (cosine 1) would make the loss small.
  z = np.array([[1.0, 0.0], [-1.0, 0.0], [0.9, 0.1], [-0.9, 0.1]], np.float32)
  labels = np.eye(2, dtype=np.float32)[[0, 0, 1, 1]]
  result = losses.suncet_loss(z, labels, tau=0.1).numpy()
  np.testing.assert_allclose(result, numpy_suncet(z, labels, 0.1), rtol=1e-5)
  assert result > 5.0

  exponentials = np.exp(numpy_normalize(z) @ numpy_normalize(z).T / 0.1)
  with_self = exponentials / exponentials.sum(axis=1, keepdims=True) @ labels
  loss_with_self = np.mean(np.sum(-labels * np.log(with_self), axis=1))
  assert loss_with_self < 1.0


# ---- several replicas ----

REPLICA_SCRIPT = textwrap.dedent("""
    import json
    import sys

    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    from utils import losses

    inputs = [np.asarray(array, np.float32) for array in json.loads(sys.argv[1])]
    batch_size, multicrop, replicas = 4, 2, 2
    local = batch_size // replicas

    def replica_rows(array, replica, blocks):
      # Each replica holds its own images, in the same block layout.
      return np.concatenate([
          array[block * batch_size + replica * local:
                block * batch_size + (replica + 1) * local]
          for block in range(blocks)])

    def loss_and_gradients(anchor_views, anchor_supports, *rest):
      with tf.GradientTape() as tape:
        tape.watch([anchor_views, anchor_supports])
        ce, me_max = losses.paws_loss(
            losses.SnnInputs(anchor_views, anchor_supports, rest[0]),
            losses.SnnInputs(*rest[1:]), multicrop=multicrop)
        # The caller's convention: each replica's loss is divided by the
        # number of replicas and the gradients are summed.
        scaled = (ce + me_max) / tf.distribute.get_strategy(
            ).num_replicas_in_sync
      return (ce, me_max) + tuple(
          tape.gradient(scaled, [anchor_views, anchor_supports]))

    single = loss_and_gradients(*[tf.constant(array) for array in inputs])

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2

    def replica_inputs(context):
      replica = context.replica_id_in_sync_group
      anchor_views, anchor_supports, anchor_labels, target_views, \\
          target_supports, target_labels = inputs
      return (
          tf.constant(replica_rows(anchor_views, replica, 2 + multicrop)),
          tf.constant(anchor_supports), tf.constant(anchor_labels),
          tf.constant(replica_rows(target_views, replica, 2)),
          tf.constant(target_supports), tf.constant(target_labels))

    distributed = strategy.experimental_distribute_values_from_function(
        replica_inputs)

    @tf.function
    def step(values):
      return strategy.run(loss_and_gradients, args=values)

    per_replica = [strategy.experimental_local_results(value)
                   for value in step(distributed)]
    ce, me_max, anchor_gradient, support_gradient = per_replica
    # Back to the global row order: block by block, replica 0 then replica 1.
    anchor_gradient_global = np.concatenate([
        np.asarray(anchor_gradient[replica])[block * local:(block + 1) * local]
        for block in range(2 + multicrop) for replica in range(replicas)])
    print(json.dumps({
        "single_ce": float(single[0]),
        "single_me_max": float(single[1]),
        "single_anchor_gradient": single[2].numpy().tolist(),
        "single_support_gradient": single[3].numpy().tolist(),
        "replica_ce": [float(value) for value in ce],
        "replica_me_max": [float(value) for value in me_max],
        "anchor_gradient": anchor_gradient_global.tolist(),
        "support_gradient": sum(
            np.asarray(value) for value in support_gradient).tolist(),
    }))
""")


def test_two_replicas_match_single_device():
  inputs = make_inputs(seed=20, batch_size=4, multicrop=2)
  environment = dict(
    os.environ,
    CUDA_VISIBLE_DEVICES="",
    TF_CPP_MIN_LOG_LEVEL="2",
    PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
  )
  completed = subprocess.run(
    [sys.executable, "-c", REPLICA_SCRIPT, json.dumps([array.tolist() for array in inputs])],
    capture_output=True,
    text=True,
    env=environment,
    cwd=REPO_ROOT,
    timeout=120,
  )
  assert completed.returncode == 0, completed.stderr[-3000:]
  result = json.loads(completed.stdout.strip().splitlines()[-1])

  # me-max uses the cross-replica mean prediction: the same on every replica
  # and equal to the single-device value on the whole batch.
  np.testing.assert_allclose(result["replica_me_max"], [result["single_me_max"]] * 2, rtol=1e-5)
  np.testing.assert_allclose(np.mean(result["replica_ce"]), result["single_ce"], rtol=1e-5)
  # Summing the per-replica gradients of loss / replicas gives the
  # single-device gradient, including through the all-reduce.
  np.testing.assert_allclose(result["anchor_gradient"], result["single_anchor_gradient"], rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(result["support_gradient"], result["single_support_gradient"], rtol=1e-4, atol=1e-7)
