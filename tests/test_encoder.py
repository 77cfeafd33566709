"""WideResNet trunk, heads, padding, initialisation and BatchNorm momentum (METHOD.md section 3)."""

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from tests import model_size
from utils.model import encoder as encoder_lib


def config(depth=28, width=2, prediction_head=False):
  return ml_collections.ConfigDict(
    dict(
      name="wrn",
      depth=depth,
      width=width,
      hidden_dim=128,
      projection_dim=128,
      prediction_head=prediction_head,
      prediction_hidden_dim=32,
    )
  )


def test_wrn_28_2_parameter_counts():
  encoder = encoder_lib.build_encoder(config(), 32)
  # conv3x3(3->16) + 12 pre-activation blocks (32, 64, 128) + final BN, all convs with bias
  assert model_size.trainable_scalars(encoder.trunk) == 1_468_352
  # 3 Dense 128->128 (with bias) + 2 BN of 128: 3 * 16512 + 2 * 256
  assert model_size.trainable_scalars(encoder.projection) == 50_048
  with_prediction = encoder_lib.build_encoder(config(prediction_head=True), 32)
  # BN(128) + Dense 128->32 + BN(32) + Dense 32->128
  assert model_size.trainable_scalars(with_prediction.prediction) == 256 + 4128 + 64 + 4224


def numpy_conv(images, kernel, bias, stride, pad):
  """Cross-correlation as PyTorch's Conv2d(padding=pad, stride=stride): zero padding on every side."""
  padded = np.pad(images, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
  kernel_height, kernel_width = kernel.shape[:2]
  out_height = (padded.shape[1] - kernel_height) // stride + 1
  out_width = (padded.shape[2] - kernel_width) // stride + 1
  out = np.zeros([images.shape[0], out_height, out_width, kernel.shape[-1]])
  for i in range(out_height):
    for j in range(out_width):
      patch = padded[:, i * stride : i * stride + kernel_height, j * stride : j * stride + kernel_width, :]
      out[:, i, j, :] = np.einsum("nhwc,hwcf->nf", patch, kernel)
  return out + bias


@pytest.mark.parametrize("size", [8, 7])
def test_convolutions_pad_symmetrically_like_pytorch(size):
  encoder = encoder_lib.build_encoder(config(depth=10, width=1), 8)
  block = encoder.trunk.blocks[1]  # stage 2: 16 -> 32 channels, stride 2 on conv2 and on the shortcut
  rng = np.random.default_rng(0)
  for layer, in_channels, stride, pad in [
    (block.conv1, 16, 1, 1),
    (block.conv2, 32, 2, 1),
    (block.shortcut, 16, 2, 0),
    (encoder.trunk.stem, 3, 1, 1),
  ]:
    images = rng.normal(size=[2, size, size, in_channels]).astype(np.float32)
    kernel, bias = (v.numpy() for v in (layer.kernel, layer.bias))
    assert kernel.shape[:2] == ((1, 1) if pad == 0 else (3, 3)) and layer.strides == (stride, stride)
    expected = numpy_conv(images.astype(np.float64), kernel, bias, stride, pad)
    np.testing.assert_allclose(layer(images).numpy(), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(tf.function(layer)(images).numpy(), expected, rtol=1e-4, atol=1e-4)  # traced
  # The 1x1 stride-2 shortcut samples the even positions (0, 2, ...).
  images = rng.normal(size=[2, size, size, 16]).astype(np.float32)
  kernel, bias = block.shortcut.kernel.numpy()[0, 0], block.shortcut.bias.numpy()
  np.testing.assert_allclose(block.shortcut(images).numpy(), images[:, ::2, ::2] @ kernel + bias, rtol=1e-4, atol=1e-4)
  if size % 2 == 0:  # TensorFlow's "same" pads bottom/right only here: the oracle tells them apart
    images = rng.normal(size=[2, size, size, 32]).astype(np.float32)
    same = tf.nn.conv2d(images, block.conv2.kernel, 2, "SAME").numpy() + block.conv2.bias.numpy()
    assert np.abs(same - block.conv2(images).numpy()).max() > 1e-2


def weighted_layers(encoder):
  return [layer for layer in encoder.submodules if isinstance(layer, (encoder_lib.Conv2D, encoder_lib.Dense))]


def test_initialisation_is_pytorch_default_fan_in_uniform():
  tf_keras.utils.set_random_seed(0)
  encoder = encoder_lib.build_encoder(config(depth=10, width=2, prediction_head=True), 8)
  kinds, normalised_biases = set(), []
  for layer in weighted_layers(encoder):
    kernel, bias = layer.kernel.numpy().ravel(), layer.bias.numpy()
    fan_in = int(np.prod(layer.kernel.shape[:-1]))  # in_channels x kh x kw (Dense: in_features)
    bound = 1 / np.sqrt(fan_in)
    kinds.add(tuple(layer.kernel.shape[:-2]) if isinstance(layer, encoder_lib.Conv2D) else "dense")
    n = kernel.size
    # U(-b, b): std b/sqrt(3); the sample std's relative standard error is sqrt(0.8 / n) / 2
    assert np.abs(kernel).max() <= bound * (1 + 1e-6), layer.name
    assert np.abs(kernel).max() >= bound * (1 - 20 / n), layer.name  # fills the whole range
    assert abs(kernel.std() / (bound / np.sqrt(3)) - 1) < 5 * 0.45 / np.sqrt(n), (layer.name, kernel.std())
    assert abs(kernel.mean()) < 5 * bound / np.sqrt(3 * n), layer.name
    assert np.abs(bias).max() <= bound * (1 + 1e-6), layer.name
    normalised_biases.append(bias / bound)
  assert kinds == {(3, 3), (1, 1), "dense"}
  biases = np.concatenate(normalised_biases)  # one bias has few entries: pool them, each scaled by its bound
  assert abs(biases.std() * np.sqrt(3) - 1) < 5 * 0.45 / np.sqrt(biases.size), biases.std()
  assert abs(biases.mean()) < 5 / np.sqrt(3 * biases.size)
  for layer in encoder.submodules:
    if isinstance(layer, tf_keras.layers.BatchNormalization):
      np.testing.assert_array_equal(layer.gamma.numpy(), 1.0)
      np.testing.assert_array_equal(layer.beta.numpy(), 0.0)


def test_initialisation_follows_the_global_seed():
  def initial_weights(seed):
    tf_keras.utils.set_random_seed(seed)
    return encoder_lib.build_encoder(config(depth=10, width=1), 8).get_weights()

  first, again, other = initial_weights(3), initial_weights(3), initial_weights(4)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  kernels_and_biases = [(a, b) for a, b in zip(first, other) if a.std() > 0]  # BN statistics are constant
  assert kernels_and_biases and all(not np.array_equal(a, b) for a, b in kernels_and_biases)


def test_outputs_and_bn_momentum_translation():
  encoder = encoder_lib.build_encoder(config(depth=10, width=1, prediction_head=True), 16)
  h, z = encoder(tf.zeros([3, 16, 16, 3]), training=False)
  assert h.shape == (3, 128) and z.shape == (3, 128)
  momenta = {
    layer.name: layer.momentum for layer in encoder.submodules if isinstance(layer, tf_keras.layers.BatchNormalization)
  }
  assert momenta.pop("final_bn") == 0.01  # PyTorch 0.99
  assert set(momenta.values()) == {0.9}  # PyTorch 0.1


def test_bn_moving_mean_update_follows_pytorch_semantics():
  x = tf.fill([4, 3, 3, 2], 5.0)  # batch mean 5, moving mean starts at 0
  final_bn = encoder_lib.batch_norm("final_bn", encoder_lib.FINAL_BN_MOMENTUM)
  final_bn(x, training=True)
  np.testing.assert_allclose(final_bn.moving_mean.numpy(), 0.99 * 5.0, rtol=1e-6)  # PyTorch momentum 0.99
  other_bn = encoder_lib.batch_norm("bn1")
  other_bn(x, training=True)
  np.testing.assert_allclose(other_bn.moving_mean.numpy(), 0.1 * 5.0, rtol=1e-6)  # PyTorch momentum 0.1


def test_embed_views_groups_share_batch_statistics():
  encoder = encoder_lib.build_encoder(config(depth=10, width=1), 8)
  a, b = tf.random.normal([4, 8, 8, 3]), tf.random.normal([4, 8, 8, 3], mean=3.0)
  small = tf.random.normal([4, 5, 5, 3])
  h, z = encoder_lib.embed_views(encoder, [[a, b], [small]], training=True)
  assert h.shape == (12, 128)
  together, _ = encoder(tf.concat([a, b], 0), training=True)
  np.testing.assert_allclose(h[:8].numpy(), together.numpy(), atol=1e-5)
  alone, _ = encoder(a, training=True)  # a different batch gives different BN statistics
  assert np.abs(h[:4].numpy() - alone.numpy()).max() > 1e-3


def test_save_and_load_round_trip(tmp_path):
  import pytest

  from utils.errors import UserError

  full = ml_collections.ConfigDict({"name": "t", "model": config(depth=10, width=1), "data": {"image_size": 8}})
  encoder = encoder_lib.build_encoder(full.model, 8)
  encoder_lib.save_encoder(encoder, full, str(tmp_path / "enc"), 5, "pretrain")
  loaded, meta = encoder_lib.load_encoder(str(tmp_path / "enc"), full, "paws_train.py")
  x = tf.random.normal([2, 8, 8, 3])
  np.testing.assert_allclose(loaded(x, training=False)[0].numpy(), encoder(x, training=False)[0].numpy(), atol=1e-6)
  assert (meta["stage"], meta["step"]) == ("pretrain", 5)
  with pytest.raises(UserError, match="no trained encoder"):
    encoder_lib.load_encoder(str(tmp_path / "missing"), full, "paws_train.py")
  other = ml_collections.ConfigDict({"name": "t", "model": config(depth=16, width=1), "data": {"image_size": 8}})
  with pytest.raises(UserError, match="model.depth"):
    encoder_lib.load_encoder(str(tmp_path / "enc"), other, "paws_train.py")


def test_reestimate_batch_norm_converges_to_the_statistics_of_the_images():
  encoder = encoder_lib.build_encoder(config(depth=10, width=1), 8)
  first_bn = encoder.trunk.blocks[0].bn1  # its input is the stem convolution's output
  first_bn.moving_mean.assign(tf.fill(first_bn.moving_mean.shape, 100.0))
  first_bn.moving_variance.assign(tf.fill(first_bn.moving_variance.shape, 1e4))
  images = tf.random.normal([6, 8, 8, 3], mean=2.0, seed=1)
  stem = encoder.trunk.stem(images).numpy().reshape(-1, 16)
  encoder_lib.reestimate_batch_norm(encoder, images)
  np.testing.assert_allclose(first_bn.moving_mean.numpy(), stem.mean(axis=0), rtol=1e-4, atol=1e-4)
  # 384 values per channel; TensorFlow keeps the unbiased variance
  np.testing.assert_allclose(first_bn.moving_variance.numpy(), stem.var(axis=0) * 384 / 383, rtol=1e-4)
  assert first_bn.momentum == encoder_lib.BN_MOMENTUM  # restored
  # Inference on the moving statistics now reproduces the trunk's batch-statistics output, up to
  # the unbiased-variance factor (256 values per channel in the last stage: 0.4 %). The heads are
  # left out: their BNs see nearly equal random-init features, too ill-conditioned to compare.
  varied = tf.random.normal([64, 8, 8, 3], seed=2) * tf.random.uniform([64, 1, 1, 1], 0.5, 2.0, seed=3)
  encoder_lib.reestimate_batch_norm(encoder, varied)
  np.testing.assert_allclose(
    encoder.trunk(varied, training=False).numpy(), encoder.trunk(varied, training=True).numpy(), rtol=1e-2, atol=1e-3
  )


def test_mixed_bfloat16_keeps_the_heads_in_float32():
  tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
  try:
    encoder = encoder_lib.build_encoder(config(depth=10, width=1, prediction_head=True), 8)
    images = tf.random.normal([4, 8, 8, 3])
    assert encoder.trunk(images).dtype == tf.bfloat16  # the expensive part runs in 16 bits
    h, z = encoder(images, training=True)
    assert h.dtype == tf.float32 and z.dtype == tf.float32
    assert all(v.dtype == tf.float32 for v in encoder.weights)  # variables stay float32
  finally:
    tf_keras.mixed_precision.set_global_policy("float32")
