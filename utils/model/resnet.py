"""ResNet-50 trunk in torchvision's layout, the paper's ImageNet network (2048-d output).

Stem conv7x7/2 (pad 3) -> BN -> ReLU -> max pool 3x3/2 (pad 1), then bottleneck stages of
[3, 4, 6, 3] blocks (widths 64, 128, 256, 512, expansion 4, strides 1, 2, 2, 2), global average pool.
Bottleneck: relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))) + shortcut(x)) with the stride on
the 3x3 conv2 ("ResNet v1.5"), and a 1x1 conv + BN shortcut where the shape changes. Convolutions have
no bias (a BN follows each).

Why not a library ResNet: tf_keras.applications.ResNet50 puts the stride on the first 1x1 conv (v1),
gives every conv a bias and uses BN epsilon 1.001e-5; Model Garden's vision ResNet has the stride on the
3x3 conv but pads with "same" (bottom/right only at stride 2 on an even input, the WideResNet's padding
problem in utils/model/encoder.py) and a BN momentum of 0.99. Neither matches the reference, so it is written
here like the WideResNet.
"""

import numpy as np
import tensorflow as tf
import tf_keras

# The reference's ResNet keeps torchvision's nn.BatchNorm2d defaults: PyTorch momentum 0.1 on every BN
# (no exception like the WideResNet's final BN), which is Keras momentum 0.9 (METHOD.md section 9,
# pitfall 1: Keras weighs the old value), and epsilon 1e-5.
BN_MOMENTUM = 0.9


BN_EPSILON = 1e-5


STAGE_WIDTHS = (64, 128, 256, 512)


STAGE_STRIDES = (1, 2, 2, 2)


EXPANSION = 4


def batch_norm(name, synchronized=False):
  """BatchNorm named 'bn*': utils/train/optim.py LARS_EXCLUDE finds it by that name (the reference's 'bn' in the
  name: no LARS, no weight decay), all but 'bn_shortcut', whose gamma takes both as torchvision's `downsample.1`."""
  if not name.startswith("bn"):
    raise ValueError(f"BatchNorm layer names must start with 'bn' (LARS excludes them by name), got {name!r}")
  return tf_keras.layers.BatchNormalization(
    momentum=BN_MOMENTUM, epsilon=BN_EPSILON, synchronized=synchronized, name=name
  )


def kaiming_normal_fan_out():
  """The reference's conv init, kaiming_normal_(mode='fan_out', nonlinearity='relu').

  Weights ~ N(0, 2 / fan_out), fan_out = out_channels x kh x kw, not truncated: VarianceScaling
  with scale 2 (ReLU gain squared), mode fan_out and the untruncated normal.
  """
  return tf_keras.initializers.VarianceScaling(scale=2.0, mode="fan_out", distribution="untruncated_normal")


class Conv2D(tf_keras.layers.Conv2D):
  """Bias-free conv with PyTorch's symmetric zero padding kernel_size // 2, kaiming fan-out init.

  Explicit padding on every side then a `valid` conv samples the positions PyTorch's `padding=k//2`
  does; `padding="same"` at stride 2 on an even input would pad bottom/right only and shift the grid.
  """

  def __init__(self, filters, kernel_size, strides=1, **kwargs):
    super().__init__(
      filters,
      kernel_size,
      strides=strides,
      padding="valid",
      use_bias=False,
      kernel_initializer=kaiming_normal_fan_out(),
      **kwargs,
    )
    self.pad = kernel_size // 2

  def build(self, input_shape):
    # Keras checks the output size of a `valid` conv on the shape it builds with: give it the padded shape
    # (a 1x1 map before a 3x3 conv, at the last stage of a 32 px input, is fine once padded).
    shape = tf.TensorShape(input_shape).as_list()
    for axis in (1, 2):
      if shape[axis] is not None:
        shape[axis] += 2 * self.pad
    super().build(shape)

  def call(self, inputs):
    if self.pad:
      inputs = tf.pad(inputs, [[0, 0], [self.pad, self.pad], [self.pad, self.pad], [0, 0]])
    return super().call(inputs)


class MaxPool2D(tf_keras.layers.MaxPool2D):
  """Max pool with PyTorch's padding: `pad` pixels of -inf on every side, then `valid`.

  PyTorch's MaxPool2d(3, 2, padding=1) takes windows starting at -1, 1, 3, ...; TensorFlow's "same"
  would start them at 0, 2, ... on an even input. -inf padding never wins a max, as in PyTorch.
  """

  def __init__(self, pool_size, strides, pad, **kwargs):
    super().__init__(pool_size=pool_size, strides=strides, padding="valid", **kwargs)
    self.pad = pad

  def call(self, inputs):
    if self.pad:
      paddings = [[0, 0], [self.pad, self.pad], [self.pad, self.pad], [0, 0]]
      inputs = tf.pad(inputs, paddings, constant_values=tf.constant(-np.inf, inputs.dtype))
    return super().call(inputs)


class Bottleneck(tf_keras.layers.Layer):
  """torchvision's Bottleneck: 1x1 -> 3x3 (stride here) -> 1x1 (x4 channels), each followed by BN."""

  def __init__(self, in_channels, width, stride, synchronized, **kwargs):
    super().__init__(**kwargs)
    out_channels = width * EXPANSION
    self.conv1 = Conv2D(width, 1, name="conv1")
    self.bn1 = batch_norm("bn1", synchronized)
    self.conv2 = Conv2D(width, 3, stride, name="conv2")
    self.bn2 = batch_norm("bn2", synchronized)
    self.conv3 = Conv2D(out_channels, 1, name="conv3")
    # torchvision's zero_init_residual defaults to False and the reference keeps it: bn3's gamma starts at 1.
    self.bn3 = batch_norm("bn3", synchronized)
    self.shortcut_conv = self.shortcut_bn = None
    if stride != 1 or in_channels != out_channels:
      self.shortcut_conv = Conv2D(out_channels, 1, stride, name="shortcut_conv")  # 1x1, no padding: even positions
      self.shortcut_bn = batch_norm("bn_shortcut", synchronized)

  def call(self, x, training=None):
    out = tf.nn.relu(self.bn1(self.conv1(x), training=training))
    out = tf.nn.relu(self.bn2(self.conv2(out), training=training))
    out = self.bn3(self.conv3(out), training=training)
    shortcut = x if self.shortcut_conv is None else self.shortcut_bn(self.shortcut_conv(x), training=training)
    return tf.nn.relu(out + shortcut)


class ResNet(tf_keras.layers.Layer):
  """Bottleneck ResNet trunk; returns the globally average-pooled [batch, 512 x 4] features."""

  def __init__(self, blocks_per_stage=(3, 4, 6, 3), synchronized=False, **kwargs):
    super().__init__(**kwargs)
    self.stem_conv = Conv2D(STAGE_WIDTHS[0], 7, 2, name="stem_conv")
    self.stem_bn = batch_norm("bn_stem", synchronized)
    self.max_pool = MaxPool2D(3, 2, pad=1, name="stem_max_pool")
    self.blocks = []
    in_channels = STAGE_WIDTHS[0]
    for stage, (width, stride, num_blocks) in enumerate(zip(STAGE_WIDTHS, STAGE_STRIDES, blocks_per_stage)):
      for index in range(num_blocks):
        self.blocks.append(
          Bottleneck(
            in_channels, width, stride if index == 0 else 1, synchronized, name=f"stage{stage + 1}_block{index + 1}"
          )
        )
        in_channels = width * EXPANSION
    self.output_dim = in_channels

  def call(self, x, training=None):
    x = tf.nn.relu(self.stem_bn(self.stem_conv(x), training=training))
    x = self.max_pool(x)
    for block in self.blocks:
      x = block(x, training=training)
    return tf.reduce_mean(x, axis=[1, 2])


def resnet50(synchronized=False, **kwargs):
  """ResNet-50: [3, 4, 6, 3] bottlenecks, 2048-d output, 23,508,032 trainable parameters."""
  return ResNet((3, 4, 6, 3), synchronized, **kwargs)
