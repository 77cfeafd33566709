"""The compiled train steps under each precision policy, and loss-scaled minimisation."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import config as presets
from utils import devices
from utils.data import augment, pipelines
from utils.model import encoder as encoder_lib
from utils.train import optim, steps

PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


@pytest.fixture
def tiny(request):
  """A tiny digits-shaped config under the requested precision policy (reset afterwards)."""
  c = presets.get_config("digits")
  c.model.hidden_dim = c.model.projection_dim = 16
  c.data.image_size, c.data.large_crop_size, c.data.small_crop_size = 8, 8, 6
  c.pretrain.batch_size, c.pretrain.multicrop = 4, 2
  c.pretrain.classes_per_batch, c.pretrain.images_per_class = 3, 2
  c.finetune.classes_per_batch, c.finetune.images_per_class = 3, 2
  c.run.precision = request.param
  devices.set_precision(c)
  yield c
  tf_keras.mixed_precision.set_global_policy("float32")


def pretrain_batch(c, seed=0):
  p, rng = c.pretrain, np.random.default_rng(seed)
  large, small = c.data.large_crop_size, c.data.small_crop_size
  views = tuple(rng.normal(size=[p.batch_size, large, large, 3]).astype(np.float32) for _ in range(2)) + tuple(
    rng.normal(size=[p.batch_size, small, small, 3]).astype(np.float32) for _ in range(p.multicrop)
  )
  supports = rng.normal(size=[p.support_views, p.classes_per_batch * p.images_per_class, large, large, 3])
  return views, supports.astype(np.float32)


def run_paws_steps(c, initial_weights, num_steps=2, batch=None, jit_compile=False):
  tf_keras.utils.set_random_seed(0)
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  p = c.pretrain
  with strategy.scope():
    encoder = encoder_lib.build_encoder(c.model, c.data.image_size)
    encoder.set_weights(initial_weights)
    optimizer = optim.build_lars(
      optim.warmup_cosine_schedule(p.start_lr, p.lr, p.final_lr, 1, 10),
      p.momentum,
      p.weight_decay,
      p.lars_eta,
      c.run.precision,
    )
  train_steps = steps.paws_steps(c, strategy, encoder, optimizer, jit_compile=jit_compile)
  iterator = iter(tf.data.Dataset.from_tensors(batch or pretrain_batch(c)).repeat())
  first = {k: float(v) for k, v in train_steps(iterator, tf.constant(1)).items()}
  train_steps(iterator, tf.constant(num_steps - 1))
  return first, encoder, optimizer


@pytest.fixture(scope="module")
def float32_reference():
  c = presets.get_config("digits")
  c.model.hidden_dim = c.model.projection_dim = 16
  tf_keras.utils.set_random_seed(0)
  return encoder_lib.build_encoder(c.model, 8).get_weights()


@pytest.mark.parametrize("tiny", PRECISIONS, indirect=True)
def test_paws_step_under_each_precision(tiny, float32_reference):
  first, encoder, optimizer = run_paws_steps(tiny, float32_reference)
  assert all(np.isfinite(v) for v in first.values())
  assert first["loss"] == pytest.approx(first["ce"] + first["me_max"], abs=1e-5)
  moved = [np.abs(a - b).max() for a, b in zip(encoder.get_weights(), float32_reference)]
  assert max(moved) > 0 and all(np.isfinite(m) for m in moved)
  assert all(w.dtype == np.float32 for w in encoder.get_weights())
  scaled = isinstance(optimizer, tf_keras.mixed_precision.LossScaleOptimizer)
  assert scaled == (tiny.run.precision == "mixed_float16")
  if tiny.run.precision != "float32":  # same maths as float32 up to 16-bit rounding
    tf_keras.mixed_precision.set_global_policy("float32")
    c32 = tiny.copy_and_resolve_references()
    c32.run.precision = "float32"
    reference, _, _ = run_paws_steps(c32, float32_reference, num_steps=1)
    assert first["ce"] == pytest.approx(reference["ce"], rel=0.05, abs=0.02)
    assert first["me_max"] == pytest.approx(reference["me_max"], rel=0.05, abs=0.02)


def streamed_batch(c, seed=0):
  """A stream_pretrain_dataset element (crops in [0, 1], colour draws) and the batch of its colour stage on the
  host, augment.apply_colour of the same crops and draws outside a step (what the in-memory pipeline gives)."""
  spec = augment.AugmentSpec.from_config(c.data)
  rng = np.random.default_rng(seed)
  crops, supports = (
    tf.nest.map_structure(lambda x: rng.uniform(size=x.shape).astype(np.float32), part)
    for part in pretrain_batch(c, seed)
  )
  view_seeds = [tf.constant([seed, view], tf.int64) for view in range(len(crops) + len(supports))]
  colour = tuple(augment.colour_draws(s, len(crops[0]), spec) for s in view_seeds[: len(crops)])
  colour += tuple(augment.colour_draws(s, supports.shape[1], spec) for s in view_seeds[len(crops) :])
  coloured = tuple(augment.apply_colour(x, draws, spec).numpy() for x, draws in zip(crops, colour))
  coloured_supports = [augment.apply_colour(x, draws, spec) for x, draws in zip(supports, colour[len(crops) :])]
  return (crops, supports, colour), (coloured, tf.stack(coloured_supports).numpy())


def colour_tiny(c):
  """Every colour op on, equalize too."""
  c.data.update(color_jitter_prob=0.8, color_jitter_strength=1.0, grayscale_prob=0.5, blur_prob=0.5)
  c.data.update(solarize_prob=0.3, equalize_prob=0.5, flip=True)
  return c


@pytest.mark.parametrize("tiny", ["float32"], indirect=True)
def test_colour_stage_compiled_in_a_step_equals_the_hosts(tiny):
  (crops, supports, colour), (coloured, coloured_supports) = streamed_batch(colour_tiny(tiny))
  spec = augment.AugmentSpec.from_config(tiny.data)
  in_step = tf.function(lambda *element: pipelines.colour_pretrain_batch(*element, spec), jit_compile=True)
  views, support_views = in_step(crops, supports, colour)
  for view, expected in zip(views, coloured, strict=True):
    np.testing.assert_allclose(view.numpy(), expected, atol=1e-5, rtol=0)
  np.testing.assert_allclose(support_views.numpy(), coloured_supports, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tiny", ["mixed_float16"], indirect=True)
def test_paws_step_applies_the_colour_stage_of_a_streamed_batch(tiny, float32_reference):
  # the XLA-compiled mixed-precision step colours the crops it is given with their draws (the ops: see above)
  tiny.data.update(color_jitter_prob=1.0, color_jitter_strength=1.0, grayscale_prob=0.5)
  streamed, coloured = streamed_batch(tiny)
  in_step, _, _ = run_paws_steps(tiny, float32_reference, 1, streamed, jit_compile=True)
  on_host, _, _ = run_paws_steps(tiny, float32_reference, 1, coloured)
  # float16 activations, XLA's kernels against TensorFlow's; the crops without colour give a ce 0.2 higher
  assert in_step["ce"] == pytest.approx(on_host["ce"], abs=5e-3)
  assert in_step["me_max"] == pytest.approx(on_host["me_max"], abs=1e-2)


@pytest.mark.parametrize("tiny", ["float32"], indirect=True)
def test_paws_step_without_small_crops(tiny, float32_reference):
  tiny.pretrain.multicrop = 0  # two large views only: the loss has no small-crop terms
  first, encoder, _ = run_paws_steps(tiny, float32_reference)
  assert np.isfinite(first["loss"]) and first["ce"] > 0
  assert max(np.abs(a - b).max() for a, b in zip(encoder.get_weights(), float32_reference)) > 0


@pytest.mark.parametrize("tiny", ["mixed_float16"], indirect=True)
def test_suncet_step_with_loss_scaling_keeps_bn_statistics_frozen(tiny):
  f = tiny.finetune
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  with strategy.scope():
    encoder = encoder_lib.build_encoder(tiny.model, tiny.data.image_size)
    optimizer = optim.build_lars(0.1, f.momentum, f.weight_decay, f.lars_eta, tiny.run.precision)
  moving = [v.numpy() for v in encoder.non_trainable_variables]
  trainable = [v.numpy() for v in encoder.trainable_variables]
  train_steps = steps.suncet_steps(tiny, strategy, encoder, optimizer, jit_compile=False, bn_training=False)
  batch = tf.random.normal([f.views, f.classes_per_batch * f.images_per_class, 8, 8, 3], seed=4)
  loss = float(train_steps(iter(tf.data.Dataset.from_tensors(batch).repeat()), tf.constant(2))["loss"])
  assert np.isfinite(loss) and loss > 0
  for before, after in zip(moving, encoder.non_trainable_variables):
    np.testing.assert_array_equal(before, after.numpy())
  assert any(np.abs(b - a.numpy()).max() > 0 for b, a in zip(trainable, encoder.trainable_variables))


def quadratic_update(optimizer, factor=1.0):
  w = tf.Variable([1.0, -2.0])
  with tf.GradientTape() as tape:
    loss = factor * tf.reduce_sum(w**2)
  optimizer.minimize(loss, [w], tape=tape)
  return w.numpy()


def test_minimize_with_loss_scaling_equals_the_plain_update():
  plain = quadratic_update(tf_keras.optimizers.SGD(0.1))
  np.testing.assert_allclose(plain, [1.0 - 0.1 * 2.0, -2.0 + 0.1 * 4.0], rtol=1e-6)  # w - lr * 2w
  scaled = tf_keras.mixed_precision.LossScaleOptimizer(tf_keras.optimizers.SGD(0.1), initial_scale=2.0**10)
  np.testing.assert_allclose(quadratic_update(scaled), plain, rtol=1e-6)


def test_minimize_skips_an_overflowing_step_and_lowers_the_scale():
  optimizer = tf_keras.mixed_precision.LossScaleOptimizer(tf_keras.optimizers.SGD(0.1), initial_scale=2.0**15)
  # 2 * 1e36 * 2**15 overflows float32: the step is skipped and the scale halved
  np.testing.assert_array_equal(quadratic_update(optimizer, factor=1e36), [1.0, -2.0])
  assert float(optimizer.loss_scale) == 2.0**14
