"""Trunks (pre-activation WideResNet; ResNet-50 in utils/model/resnet.py) with PAWS projection and prediction heads.

METHOD.md section 3. `model.name` in config.py picks the trunk: "wrn" (CIFAR-10, digits) or "resnet50" (the
paper's ImageNet network); the heads take their input width from the trunk's output.
"""

from ml_collections import ConfigDict
import numpy as np
import tensorflow as tf
import tf_keras

from utils import config_rules
from utils.errors import UserError
from utils.model import resnet, saved

# PyTorch's BatchNorm momentum m updates moving = (1 - m) * moving + m * batch;
# Keras' momentum is the weight on the OLD value. The reference uses PyTorch
# 0.1 everywhere (Keras 0.9) except the trunk's final BN, PyTorch 0.99
# (Keras 0.01). METHOD.md section 9, pitfall 1: copying the number inverts it.
BN_MOMENTUM = 0.9


FINAL_BN_MOMENTUM = 0.01


BN_EPSILON = 1e-5  # PyTorch's default


def batch_norm(name, momentum=BN_MOMENTUM, synchronized=False, dtype=None):
  """BatchNorm whose variables carry 'bn' in their name (LARS excludes them)."""
  return tf_keras.layers.BatchNormalization(
    momentum=momentum, epsilon=BN_EPSILON, synchronized=synchronized, name=name, dtype=dtype
  )


def fan_in_uniform_bound(fan_in):
  """PyTorch's default Conv/Linear init bound 1/sqrt(fan_in), for weights and biases alike."""
  return 1.0 / np.sqrt(fan_in)


def fan_in_uniform_kernel():
  """Weights ~ U(+-1/sqrt(fan_in)), fan_in = in_channels x kh x kw (METHOD.md section 3).

  The reference's WRN and heads have no init code, so PyTorch's default
  kaiming_uniform_(a=sqrt(5)) applies: bound sqrt(3) * sqrt(2 / (1 + 5)) /
  sqrt(fan_in) = 1/sqrt(fan_in), which is VarianceScaling's uniform limit
  sqrt(3 * scale / fan_in) at scale 1/3. (The kaiming-normal fan-out init in
  the reference belongs to its ImageNet ResNet, not to the WRN.)
  """
  return tf_keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in", distribution="uniform")


def set_fan_in_uniform_bias(layer, input_shape):
  """Gives `layer` PyTorch's default bias init U(+-1/sqrt(fan_in)); call from build().

  A Keras initializer only sees the bias shape [units], which does not carry
  fan_in, so the bound is fixed here, where the input depth is first known.
  Unseeded like the kernel's, it takes its seed, when first called, from the
  generator tf_keras.utils.set_random_seed seeds, so it stays deterministic.
  """
  fan_in = int(input_shape[-1]) * int(np.prod(getattr(layer, "kernel_size", ())))
  bound = fan_in_uniform_bound(fan_in)
  layer.bias_initializer = tf_keras.initializers.RandomUniform(-bound, bound)


class Conv2D(tf_keras.layers.Conv2D):
  """Conv with PyTorch's symmetric zero padding (kernel_size - 1) / 2 and PyTorch's default init.

  `padding="same"` at stride 2 on an even input pads only bottom/right, which
  shifts the sampling grid by one pixel against the reference's `padding=1`;
  padding explicitly on every side, then a `valid` conv, samples the same
  positions (3x3: pad 1; the 1x1 shortcut: pad 0, i.e. even positions).
  """

  def __init__(self, filters, kernel_size, strides, **kwargs):
    super().__init__(
      filters,
      kernel_size,
      strides=strides,
      padding="valid",
      use_bias=True,
      kernel_initializer=fan_in_uniform_kernel(),
      **kwargs,
    )
    self.pad = (kernel_size - 1) // 2

  def build(self, input_shape):
    set_fan_in_uniform_bias(self, input_shape)
    super().build(input_shape)

  def call(self, inputs):
    if self.pad:
      inputs = tf.pad(inputs, [[0, 0], [self.pad, self.pad], [self.pad, self.pad], [0, 0]])
    return super().call(inputs)


class Dense(tf_keras.layers.Dense):
  """Dense with PyTorch's default nn.Linear init (weights and bias U(+-1/sqrt(in_features)))."""

  def __init__(self, units, **kwargs):
    super().__init__(units, kernel_initializer=fan_in_uniform_kernel(), **kwargs)

  def build(self, input_shape):
    set_fan_in_uniform_bias(self, input_shape)
    super().build(input_shape)


def conv(filters, kernel_size, strides, name):
  return Conv2D(filters, kernel_size, strides, name=name)


class PreActBlock(tf_keras.layers.Layer):
  """out = conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut(x); stride on conv2."""

  def __init__(self, in_width, width, stride, synchronized, **kwargs):
    super().__init__(**kwargs)
    self.bn1 = batch_norm("bn1", synchronized=synchronized)
    self.conv1 = conv(width, 3, 1, "conv1")
    self.bn2 = batch_norm("bn2", synchronized=synchronized)
    self.conv2 = conv(width, 3, stride, "conv2")
    self.shortcut = None
    if stride != 1 or in_width != width:
      self.shortcut = conv(width, 1, stride, "shortcut")

  def call(self, x, training=None):
    out = self.conv1(tf.nn.relu(self.bn1(x, training=training)))
    out = self.conv2(tf.nn.relu(self.bn2(out, training=training)))
    return out + (x if self.shortcut is None else self.shortcut(x))


class WideResNet(tf_keras.layers.Layer):
  """Pre-activation WRN-depth-width trunk: conv3x3 -> 3 stages -> BN -> ReLU -> GAP."""

  def __init__(self, depth=28, width=2, synchronized=False, **kwargs):
    super().__init__(**kwargs)
    if (depth - 4) % 6:
      raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
    blocks_per_stage = (depth - 4) // 6
    widths = [16 * width, 32 * width, 64 * width]
    self.stem = conv(16, 3, 1, "stem_conv")
    self.blocks = []
    in_width = 16
    for stage, (stage_width, stride) in enumerate(zip(widths, (1, 2, 2))):
      for index in range(blocks_per_stage):
        self.blocks.append(
          PreActBlock(
            in_width, stage_width, stride if index == 0 else 1, synchronized, name=f"stage{stage + 1}_block{index + 1}"
          )
        )
        in_width = stage_width
    self.final_bn = batch_norm("final_bn", FINAL_BN_MOMENTUM, synchronized)
    self.output_dim = widths[-1]

  def call(self, x, training=None):
    x = self.stem(x)
    for block in self.blocks:
      x = block(x, training=training)
    x = tf.nn.relu(self.final_bn(x, training=training))
    return tf.reduce_mean(x, axis=[1, 2])


def mlp_head(layer_dims, batch_norm_first, synchronized, name):
  """Dense-BN-ReLU stack whose last Dense has no BN/ReLU; optional leading BN.

  Always float32, also under a mixed-precision policy: the embeddings feed
  softmaxes at temperature 0.1 and a sharpening with T = 0.25, which magnify
  the rounding of 16-bit outputs; the heads cost little next to the trunk.
  """
  layers = [batch_norm("bn_in", synchronized=synchronized, dtype="float32")] if batch_norm_first else []
  for index, dim in enumerate(layer_dims):
    layers.append(Dense(dim, name=f"dense{index + 1}", dtype="float32"))
    if index < len(layer_dims) - 1:
      layers.append(batch_norm(f"bn{index + 1}", synchronized=synchronized, dtype="float32"))
      layers.append(tf_keras.layers.ReLU(name=f"relu{index + 1}", dtype="float32"))
  return tf_keras.Sequential(layers, name=name)


def build_trunk(model_name, depth, width, synchronized_bn):
  """The trunk `model_name` names: "wrn" (WRN-depth-width) or "resnet50" (depth and width unused)."""
  if model_name == "wrn":
    return WideResNet(depth, width, synchronized_bn, name="trunk")
  if model_name == "resnet50":
    return resnet.resnet50(synchronized_bn, name="trunk")
  config_rules.check_choice("model.name", model_name)


class Encoder(tf_keras.Model):
  """Trunk + projection head (+ optional prediction head).

  Calling it returns (h, z): h is the projection-head output, z the
  prediction-head output (z = h without a prediction head; METHOD.md section 2).
  The trunk follows the global precision policy; the heads are float32. The
  first Dense of the projection head takes the trunk's output width
  (`trunk.output_dim`: 128 for WRN-28-2, 2048 for ResNet-50).
  """

  def __init__(
    self,
    model_name="wrn",
    depth=28,
    width=2,
    projection_dim=128,
    hidden_dim=128,
    prediction_head=False,
    prediction_hidden_dim=32,
    synchronized_bn=False,
    **kwargs,
  ):
    super().__init__(**kwargs)
    self.trunk = build_trunk(model_name, depth, width, synchronized_bn)
    self.projection = mlp_head([hidden_dim, hidden_dim, projection_dim], False, synchronized_bn, "projection")
    self.prediction = None
    if prediction_head:
      self.prediction = mlp_head([prediction_hidden_dim, projection_dim], True, synchronized_bn, "prediction")

  def call(self, images, training=None):
    h = self.projection(self.trunk(images, training=training), training=training)
    z = h if self.prediction is None else self.prediction(h, training=training)
    return h, z


def build_encoder(model_config: ConfigDict, image_size: int, synchronized_bn: bool = False) -> "Encoder":
  """Builds an Encoder from the config's `model` section and creates its variables."""
  encoder = Encoder(
    model_name=model_config.name,
    depth=model_config.depth,
    width=model_config.width,
    projection_dim=model_config.projection_dim,
    hidden_dim=model_config.hidden_dim,
    prediction_head=model_config.prediction_head,
    prediction_hidden_dim=model_config.prediction_hidden_dim,
    synchronized_bn=synchronized_bn,
    name="encoder",
  )
  encoder(tf.zeros([2, image_size, image_size, 3]), training=False)
  return encoder


def build_for_strategy(config: ConfigDict, strategy: tf.distribute.Strategy) -> "Encoder":
  """build_encoder for the config's model and image size, with synchronised BatchNorm across replicas."""
  return build_encoder(config.model, config.data.image_size, synchronized_bn=strategy.num_replicas_in_sync > 1)


def embed_views(encoder: "Encoder", view_groups: list[list[tf.Tensor]], training: bool) -> tuple[tf.Tensor, tf.Tensor]:
  """Embeds groups of same-resolution view batches, one encoder call per group.

  All batches in a group share BatchNorm batch statistics (METHOD.md section 3:
  supports and large views together, small crops together).

  Args:
    encoder: an Encoder.
    view_groups: list of lists of image batches; within a group all batches
      have the same spatial size.
    training: BatchNorm mode.
  Returns:
    (h, z): each the concatenation over groups, in the given order, of the
    encoder outputs, as [sum of batch sizes, dim] tensors.
  """
  h_parts, z_parts = [], []
  for group in filter(None, view_groups):  # an empty group (e.g. no small crops) is skipped
    h, z = encoder(tf.concat(group, axis=0), training=training)
    h_parts.append(h)
    z_parts.append(z)
  return tf.concat(h_parts, axis=0), tf.concat(z_parts, axis=0)


def reestimate_batch_norm(encoder: tf_keras.Model, images: tf.Tensor) -> None:
  """Sets every BatchNorm's moving statistics to those of `images` (one batch).

  A network trained from scratch on a few images ends with moving averages that
  lag its weights. One training-mode forward pass at momentum 0 (no gradient
  step) replaces them by the statistics of clean images; the momenta are then
  restored.
  """
  layers = [layer for layer in encoder.submodules if isinstance(layer, tf_keras.layers.BatchNormalization)]
  momenta = [layer.momentum for layer in layers]
  try:
    for layer in layers:
      layer.momentum = 0.0
    encoder(images, training=True)
  finally:
    for layer, momentum in zip(layers, momenta):
      layer.momentum = momentum


def exists(directory: str) -> bool:
  """Whether `directory` holds an encoder save_encoder wrote."""
  return saved.exists(directory, saved.ENCODER)


def save_encoder(encoder: tf_keras.Model, config: ConfigDict, directory: str, step: int, stage: str) -> str:
  """Writes the encoder weights and the model config fine_tune.py / nn_eval.py need (any tf.io.gfile path).

  step, stage: the training step the weights are from and the stage that trained them ("pretrain" or "finetune").
  """
  return saved.save(encoder, saved.ENCODER, directory, saved.model_meta(config, stage=stage, step=step))


def load_encoder(directory: str, config: ConfigDict, what: str) -> tuple[tf_keras.Model, dict]:
  """Rebuilds the encoder saved by save_encoder; errors if missing or from another model config.

  what: the script that writes `directory`, for the message when it is missing.
  """
  meta = saved.read_meta(directory, saved.ENCODER, f"no trained encoder there; run {what} first with this --workdir")
  changed = saved.changed_fields(meta, config, check_image_size=False)
  if changed:
    raise UserError(
      f"the encoder in {directory} was trained with another model config ({', '.join(changed)} differ); "
      "use the same --config as for training"
    )
  encoder = build_encoder(config.model, config.data.image_size)
  saved.read_weights(encoder, saved.ENCODER, directory, "re-run the step that wrote them")
  return encoder, meta
