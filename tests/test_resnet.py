"""ResNet-50 trunk (utils/model/resnet.py): size, PyTorch padding grid, init, BN, heads, LARS exclusions, a step."""

import re

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import config as presets
from tests import model_size
from utils import config_rules, devices
from utils.errors import UserError
from utils.model import encoder as encoder_lib
from utils.model import resnet
from utils.train import optim, steps


def imagenet_model(prediction_head=True):
  """The paper's ImageNet model section: ResNet-50, 2048-d heads, 512-d prediction bottleneck."""
  return ml_collections.ConfigDict(
    dict(
      name="resnet50",
      depth=28,
      width=2,
      hidden_dim=2048,
      projection_dim=2048,
      prediction_head=prediction_head,
      prediction_hidden_dim=512,
    )
  )


@pytest.fixture(scope="module")
def small_encoder():
  """The full ResNet-50 encoder built on 32 px inputs (the variables do not depend on the input size)."""
  tf_keras.utils.set_random_seed(0)
  return encoder_lib.build_encoder(imagenet_model(), 32)


def batch_norms(layer):
  return [m for m in layer.submodules if isinstance(m, tf_keras.layers.BatchNormalization)]


def convolutions(layer):
  return [m for m in layer.submodules if isinstance(m, resnet.Conv2D)]


def torchvision_resnet50_parameters():
  """Parameter count of torchvision's resnet50 without fc, from its layer list (weights + BN gamma/beta)."""
  total = 3 * 7 * 7 * 64 + 2 * 64  # stem conv + BN
  in_channels = 64
  for width, num_blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
    for index in range(num_blocks):
      total += in_channels * width + 2 * width  # conv1 1x1 + bn1
      total += 9 * width * width + 2 * width  # conv2 3x3 + bn2
      total += width * 4 * width + 2 * 4 * width  # conv3 1x1 + bn3
      if index == 0:  # downsample 1x1 + BN (every first block changes the depth)
        total += in_channels * 4 * width + 2 * 4 * width
      in_channels = 4 * width
  return total


def test_resnet50_parameter_counts(small_encoder):
  assert torchvision_resnet50_parameters() == 23_508_032  # torchvision resnet50: 25,557,032 minus fc's 2,049,000
  assert model_size.trainable_scalars(small_encoder.trunk) == 23_508_032
  assert small_encoder.trunk.output_dim == 2048
  # 53 convs (1 stem + 16 blocks x 3 + 4 shortcuts), each followed by a BN; no conv has a bias.
  assert len(convolutions(small_encoder.trunk)) == len(batch_norms(small_encoder.trunk)) == 53
  assert not any(conv.use_bias for conv in convolutions(small_encoder.trunk))
  # torchvision's layout: the stride sits on the 3x3 conv2 and the shortcut, never on conv1 (tf_keras' v1).
  assert small_encoder.trunk.stem_conv.strides == (2, 2) and small_encoder.trunk.stem_conv.kernel.shape[:2] == (7, 7)
  blocks = small_encoder.trunk.blocks
  assert [b.conv2.strides[0] for b in blocks] == [1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1]
  assert all(b.conv1.strides[0] == 1 and b.conv3.strides[0] == 1 for b in blocks)
  assert [b.shortcut_conv is not None and b.shortcut_conv.strides[0] for b in blocks].count(2) == 3
  assert [b.shortcut_conv is not None for b in blocks].count(True) == 4
  # Heads sized from the trunk: Dense 2048->2048 (x2) and 2048->2048 with 2 BN(2048); BN, 2048->512, BN, 512->2048.
  assert model_size.trainable_scalars(small_encoder.projection) == 3 * (2048 * 2048 + 2048) + 2 * 2 * 2048
  assert model_size.trainable_scalars(small_encoder.prediction) == 2 * 2048 + (2048 * 512 + 512) + 2 * 512 + (
    512 * 2048 + 2048
  )


def numpy_conv(images, kernel, stride, pad):
  """Cross-correlation as PyTorch's Conv2d(padding=pad, stride=stride, bias=False)."""
  padded = np.pad(images, [(0, 0), (pad, pad), (pad, pad), (0, 0)])
  size = kernel.shape[0]
  out_height, out_width = ((np.array(padded.shape[1:3]) - size) // stride + 1).tolist()
  out = np.zeros([images.shape[0], out_height, out_width, kernel.shape[-1]])
  for i in range(out_height):
    for j in range(out_width):
      patch = padded[:, i * stride : i * stride + size, j * stride : j * stride + size, :]
      out[:, i, j, :] = np.einsum("nhwc,hwcf->nf", patch, kernel)
  return out


def numpy_max_pool(images, size, stride, pad):
  """PyTorch's MaxPool2d(size, stride, padding=pad): padding with -inf, never selected."""
  padded = np.pad(images, [(0, 0), (pad, pad), (pad, pad), (0, 0)], constant_values=-np.inf)
  out_height, out_width = ((np.array(padded.shape[1:3]) - size) // stride + 1).tolist()
  out = np.zeros([images.shape[0], out_height, out_width, images.shape[-1]])
  for i in range(out_height):
    for j in range(out_width):
      out[:, i, j] = padded[:, i * stride : i * stride + size, j * stride : j * stride + size].max(axis=(1, 2))
  return out


@pytest.mark.parametrize("size", [16, 15])
def test_strided_convolutions_sample_pytorchs_grid(small_encoder, size):
  trunk, rng = small_encoder.trunk, np.random.default_rng(0)
  block = trunk.blocks[3]  # stage 2, block 1: 3x3/2 conv2 (128 channels) and a 1x1/2 shortcut (256 -> 512)
  for layer, in_channels, kernel_size, stride, pad in [
    (trunk.stem_conv, 3, 7, 2, 3),
    (block.conv2, 128, 3, 2, 1),
    (block.shortcut_conv, 256, 1, 2, 0),
  ]:
    assert layer.kernel.shape[:2] == (kernel_size, kernel_size) and layer.strides == (stride, stride)
    images = rng.normal(size=[2, size, size, in_channels]).astype(np.float32)
    expected = numpy_conv(images.astype(np.float64), layer.kernel.numpy().astype(np.float64), stride, pad)
    assert layer(images).shape == expected.shape  # 16 -> 8, 15 -> 8 as PyTorch
    np.testing.assert_allclose(layer(images).numpy(), expected, rtol=1e-4, atol=1e-3)
    if size % 2 == 0 and pad:  # TensorFlow's "same" pads bottom/right only here: the oracle tells them apart
      same = tf.nn.conv2d(images, layer.kernel, stride, "SAME").numpy()
      assert np.abs(same - expected).max() > 1e-2


@pytest.mark.parametrize("size", [8, 7])
def test_max_pool_pads_with_minus_infinity_like_pytorch(small_encoder, size):
  pool = small_encoder.trunk.max_pool
  # Negative values everywhere: a zero padding would win the border windows, -inf never does.
  images = -1 - np.random.default_rng(1).random([2, size, size, 3]).astype(np.float32)
  expected = numpy_max_pool(images.astype(np.float64), 3, 2, 1)
  np.testing.assert_array_equal(pool(images).numpy(), expected.astype(np.float32))
  assert (expected < 0).all()
  if size % 2 == 0:
    same = tf.nn.max_pool2d(images, 3, 2, "SAME").numpy()
    assert same.shape == expected.shape and not np.array_equal(same, expected)  # shifted grid
  gradient_input = tf.constant(images)
  with tf.GradientTape() as tape:
    tape.watch(gradient_input)
    total = tf.reduce_sum(pool(gradient_input))
  assert np.isfinite(tape.gradient(total, gradient_input).numpy()).all()


def test_initialisation_is_kaiming_normal_fan_out_and_bn_is_pytorchs(small_encoder):
  trunk = small_encoder.trunk
  for conv in convolutions(trunk):
    kernel = conv.kernel.numpy().astype(np.float64)
    fan_out = kernel.shape[0] * kernel.shape[1] * kernel.shape[3]  # out_channels x kh x kw
    std = np.sqrt(2.0 / fan_out)
    # The sample std's relative standard error is about 1 / sqrt(2 n).
    assert abs(kernel.std() / std - 1) < 5 / np.sqrt(2 * kernel.size), conv.name
    assert abs(kernel.mean()) < 5 * std / np.sqrt(kernel.size), conv.name
  # Untruncated: a large layer has values beyond 2 std (a truncated normal stops there).
  largest = max(convolutions(trunk), key=lambda c: int(tf.size(c.kernel)))
  assert np.abs(largest.kernel.numpy()).max() > 3 * np.sqrt(2.0 / (largest.kernel.shape[0] ** 2 * largest.filters))
  for bn in batch_norms(small_encoder):
    assert bn.momentum == 0.9 and bn.epsilon == 1e-5, bn.name  # PyTorch momentum 0.1 everywhere, no 0.99 BN
    np.testing.assert_array_equal(bn.gamma.numpy(), 1.0)  # zero_init_residual=False: bn3 too
    np.testing.assert_array_equal(bn.beta.numpy(), 0.0)
    assert bn.name.startswith("bn")


def test_bn_moving_mean_follows_pytorch_momentum():
  bn = resnet.batch_norm("bn1")
  bn(tf.fill([4, 3, 3, 2], 5.0), training=True)
  np.testing.assert_allclose(bn.moving_mean.numpy(), 0.1 * 5.0, rtol=1e-6)
  with pytest.raises(ValueError, match="start with 'bn'"):
    resnet.batch_norm("shortcut_norm")


def test_lars_excludes_the_references_group(small_encoder):
  """The reference's rule ('bias' or 'bn' in the PyTorch name): every BN offset and bias is excluded, every BN
  scale too except the shortcut BN's (torchvision's `downsample.1.weight`); tensor by tensor against the
  reference's names in tests/test_lars_groups.py."""
  shortcut_scales = {id(b.shortcut_bn.gamma) for b in small_encoder.trunk.blocks if b.shortcut_bn is not None}
  bn_variables = {id(v) for bn in batch_norms(small_encoder) for v in (bn.gamma, bn.beta)} - shortcut_scales
  # By variable (the two heads repeat names such as dense1/kernel:0).
  excluded = {id(v): id(v) in bn_variables or v.name.endswith("/bias:0") for v in small_encoder.trainable_variables}
  assert all(optim.excluded_from_lars(v.name) == excluded[id(v)] for v in small_encoder.trainable_variables)
  # Trunk: 53 BN offsets and 49 BN scales excluded; 53 conv kernels and the 4 shortcut BN scales adapted.
  # Heads: 5 Dense (kernel adapted, bias excluded) and 4 BN (both excluded).
  assert len(shortcut_scales) == 4
  assert list(excluded.values()).count(True) == 2 * 53 - 4 + 5 + 2 * 4
  assert list(excluded.values()).count(False) == 53 + 4 + 5
  # One LARS update on copies (same names, so the same exclusions) of the stem, a block with a shortcut and
  # the prediction head: every excluded variable takes -lr * g, every other the trust-ratio step with decay.
  chosen = [
    v
    for v in small_encoder.trainable_variables
    if "/stem_" in v.name or "/bn_stem/" in v.name or "/stage2_block1/" in v.name or "trunk" not in v.name
  ]
  names = {re.sub(r"^encoder/trunk/stage2_block1/|^encoder/trunk/", "", v.name) for v in chosen}
  assert {"bn_stem/gamma:0", "bn_shortcut/gamma:0", "bn_shortcut/beta:0", "bn3/gamma:0", "bn_in/gamma:0"} <= names
  assert "dense1/bias:0" in names
  copies = [tf.Variable(v.numpy(), name=v.name.split(":")[0]) for v in chosen]
  assert [c.name for c in copies] == [v.name for v in chosen]
  rng = np.random.default_rng(0)
  gradients = [rng.normal(size=v.shape).astype(np.float32) for v in chosen]
  learning_rate, weight_decay, eta = 0.5, 0.1, 0.001
  optimizer = optim.build_lars(learning_rate, 0.9, weight_decay, eta)
  optimizer.apply_gradients(zip([tf.constant(g) for g in gradients], copies))  # momentum slots start at 0
  for copy, original, gradient in zip(copies, chosen, gradients):
    weights = original.numpy().astype(np.float64)
    if excluded[id(original)]:
      expected = weights - learning_rate * gradient
    else:
      decayed = gradient + weight_decay * weights
      expected = weights - learning_rate * eta * np.linalg.norm(weights) / np.linalg.norm(decayed) * decayed
    np.testing.assert_allclose(copy.numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=copy.name)


def test_model_name_selects_the_trunk():
  assert isinstance(encoder_lib.build_trunk("resnet50", 28, 2, False), resnet.ResNet)
  assert isinstance(encoder_lib.build_trunk("wrn", 10, 1, False), encoder_lib.WideResNet)
  with pytest.raises(UserError, match="model.name='resnet18' is not allowed: must be one of wrn, resnet50"):
    encoder_lib.build_trunk("resnet18", 28, 2, False)
  config = presets.get_config("cifar10")
  assert config.model.name == "wrn"
  config.model.name = "resnet18"
  assert config_rules.config_problems(config) == ["model.name='resnet18' is not allowed: must be one of wrn, resnet50"]
  config.model.name = "resnet50"
  assert config_rules.config_problems(config) == []


def test_synchronized_bn_and_mixed_precision():
  try:
    tf_keras.mixed_precision.set_global_policy("mixed_bfloat16")
    encoder = encoder_lib.build_encoder(imagenet_model(), 32, synchronized_bn=True)
  finally:
    tf_keras.mixed_precision.set_global_policy("float32")
  assert all(bn.synchronized for bn in batch_norms(encoder))
  assert all(conv.compute_dtype == "bfloat16" for conv in convolutions(encoder.trunk))  # trunk: global policy
  assert all(layer.compute_dtype == "float32" for layer in encoder.projection.layers + encoder.prediction.layers)
  assert all(v.dtype == tf.float32 for v in encoder.variables)
  assert encoder.trunk(tf.zeros([1, 32, 32, 3])).dtype == tf.bfloat16
  h, z = encoder(tf.zeros([1, 32, 32, 3]))
  assert h.dtype == z.dtype == tf.float32


def test_full_size_forward():
  tf_keras.utils.set_random_seed(0)
  encoder = encoder_lib.build_encoder(imagenet_model(), 224)
  images = tf.random.stateless_normal([2, 224, 224, 3], seed=[1, 2])
  features = encoder.trunk(images, training=False)
  h, z = encoder(images, training=False)
  assert features.shape == (2, 2048) and h.shape == (2, 2048) and z.shape == (2, 2048)
  assert (features.numpy() >= 0).all() and np.isfinite(h.numpy()).all() and np.isfinite(z.numpy()).all()
  # Without a prediction head z is h (METHOD.md section 2).
  encoder = encoder_lib.build_encoder(imagenet_model(prediction_head=False), 224)
  h, z = encoder(images[:1], training=False)
  assert h.shape == (1, 2048) and z is h


def test_train_steps_on_a_repeated_batch():
  """A PAWS step (finite, moves the weights), then SuNCEt steps whose loss falls on one batch.

  The PAWS loss is not a fixed objective (its targets are the network's own sharpened outputs), so the
  falling loss is checked on the supervised SuNCEt step of fine-tuning, on 64 px images.
  """
  c = presets.get_config("cifar10")
  c.model.name = "resnet50"
  c.model.hidden_dim = c.model.projection_dim = 2048
  c.model.prediction_head, c.model.prediction_hidden_dim = True, 512
  c.data.image_size, c.data.large_crop_size, c.data.small_crop_size = 64, 64, 32
  p, f = c.pretrain, c.finetune
  p.batch_size, p.multicrop, p.classes_per_batch, p.images_per_class, p.support_views = 2, 2, 2, 1, 1
  f.classes_per_batch, f.images_per_class, f.views = 2, 2, 1
  c.run.precision = "float32"
  devices.set_precision(c)
  tf_keras.utils.set_random_seed(0)
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  with strategy.scope():
    encoder = encoder_lib.build_encoder(c.model, c.data.image_size)
    optimizer = optim.build_lars(p.lr, p.momentum, p.weight_decay, p.lars_eta)
  rng = np.random.default_rng(0)
  views = tuple(rng.normal(size=[2, 64, 64, 3]).astype(np.float32) for _ in range(2)) + tuple(
    rng.normal(size=[2, 32, 32, 3]).astype(np.float32) for _ in range(2)
  )
  supports = rng.normal(size=[1, 2, 64, 64, 3]).astype(np.float32)  # [views, 2 classes x 1 image, ...]
  paws = steps.paws_steps(c, strategy, encoder, optimizer, jit_compile=False)
  before = [w.copy() for w in encoder.get_weights()]
  metrics = paws(iter(tf.data.Dataset.from_tensors((views, supports)).repeat()), tf.constant(1))
  assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
  after = encoder.get_weights()
  assert all(np.isfinite(w).all() for w in after)
  assert max(np.abs(a - b).max() for a, b in zip(after, before)) > 0

  with strategy.scope():
    # A tenth of the fine-tuning rate: small steps on 4 images make each update lower this loss.
    optimizer = optim.build_lars(f.lr / 10, f.momentum, f.weight_decay, f.lars_eta)
  labeled = rng.normal(size=[1, 4, 64, 64, 3]).astype(np.float32)  # [views, 2 images x 2 classes, ...]
  suncet = steps.suncet_steps(c, strategy, encoder, optimizer, jit_compile=False, bn_training=True)
  iterator = iter(tf.data.Dataset.from_tensors(labeled).repeat())
  losses = [float(suncet(iterator, tf.constant(1))["loss"]) for _ in range(3)]
  assert all(np.isfinite(losses)), losses
  assert losses[2] < losses[1] < losses[0], losses
