"""Estimated GPU memory of one PAWS train step at a preset's shapes, from the activations the backward pass keeps.

Traces (never runs: no memory is used) the encoder's forward and backward pass on the step's two view
groups, as utils/train/steps.paws_steps embeds them: supports + 2 large views at the large crop size, the small
crops at the small crop size. Every tensor the forward pass produces and the backward pass reads is an
activation saved for the backward pass (a conv's input, a BatchNorm's input, a ReLU's output, ...); their
sizes come from the traced graph's static shapes and dtypes (16-bit in the trunk under mixed_float16, the
heads in float32). The estimate adds the input batch, the weights, their gradients and the LARS momentum,
the PAWS loss's similarity matrices and, for the backward pass itself, two gradient buffers of the largest
activation. It leaves out cuDNN workspaces and allocator fragmentation, and XLA or Grappler rewrites that
recompute or fuse activations: an estimate, not a measurement.

  python -m benchmarks.activation_memory [--config=config.py:cifar10] [--config.FIELD=VALUE ...]
                                         [--precisions=float32,mixed_float16]

from the repository root. --config and its overrides are the entry scripts' (paws_train.py): the preset's
shapes are the ones estimated; --precisions lists the precision policies to estimate them under.

On one GPU the whole global batch is one replica's; with N replicas divide the activations by N.
"""

import collections
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tracing only: no device memory needed

from absl import app, flags
import tensorflow as tf
import tf_keras

from utils import cli
from utils.model import encoder as encoder_lib

_CONFIG = cli.define_config_flag("config.py:cifar10")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
_PRECISIONS = flags.DEFINE_list(
  "precisions", ["float32", "mixed_float16"], f"Precision policies to estimate, comma-separated: {PRECISIONS}."
)
flags.register_validator(
  "precisions",
  lambda values: bool(values) and all(value in PRECISIONS for value in values),
  f"must name one or more of {', '.join(PRECISIONS)}, comma-separated",
)

GIB = 2.0**30
# Outputs of these ops are weights, constants or shapes, not activations.
NOT_ACTIVATIONS = {"ReadVariableOp", "Const", "Shape", "VarHandleOp", "Placeholder", "Identity"}
# Forward-pass side effects (BatchNorm moving averages) that read per-channel statistics, not activations.
UPDATES = {"AssignSubVariableOp", "AssignVariableOp", "AssignAddVariableOp"}


def step_shapes(config):
  """(images, size) of the two view groups of one PAWS step, all replicas together."""
  p, d = config.pretrain, config.data
  supports = p.support_views * p.images_per_class * p.classes_per_batch
  groups = [(supports + 2 * p.batch_size, d.large_crop_size)]
  if p.multicrop:
    groups.append((p.multicrop * p.batch_size, d.small_crop_size))
  return groups


def saved_activations(config, precision):
  """Bytes of the forward tensors the backward pass reads, by op type, and the largest one."""
  tf_keras.mixed_precision.set_global_policy(precision)
  try:
    encoder = encoder_lib.build_encoder(config.model, config.data.image_size)
    specs = [tf.TensorSpec([n, size, size, 3], tf.float32) for n, size in step_shapes(config)]

    @tf.function
    def forward_backward(*groups):
      with tf.GradientTape() as tape:
        h, _ = encoder_lib.embed_views(encoder, [[g] for g in groups], training=True)
        total = tf.reduce_sum(tf.cast(h, tf.float32))  # any scalar of h: the encoder's part is what is counted
      return total, tape.gradient(total, encoder.trainable_variables)

    graph = forward_backward.get_concrete_function(*specs).graph
  finally:
    tf_keras.mixed_precision.set_global_policy("float32")
  # The forward pass: every op `total` depends on. The backward pass: the ops that read a forward tensor
  # and are not forward ops themselves (gradient ops, including the unscoped AddN that sum gradients).
  forward, pending = set(), [graph.outputs[0].op]
  while pending:
    operation = pending.pop()
    if operation.name not in forward:
      forward.add(operation.name)
      pending.extend(tensor.op for tensor in operation.inputs)
  saved, by_type, largest = set(), collections.Counter(), 0
  for operation in graph.get_operations():
    if operation.name in forward or operation.type in UPDATES:
      continue
    for tensor in operation.inputs:
      producer = tensor.op
      if (
        producer.name not in forward
        or producer.type in NOT_ACTIVATIONS
        or tensor.dtype == tf.resource
        or tensor.name in saved
        or not tensor.shape.is_fully_defined()
      ):
        continue
      saved.add(tensor.name)
      size = tensor.shape.num_elements() * tensor.dtype.size
      by_type[producer.type] += size
      largest = max(largest, size)
  parameters = sum(v.shape.num_elements() for v in encoder.trainable_variables)
  return by_type, largest, parameters


def loss_bytes(config):
  """The PAWS loss's float32 similarity and probability matrices (queries x supports, a few copies)."""
  p = config.pretrain
  supports = p.support_views * p.images_per_class * p.classes_per_batch
  queries = (2 + p.multicrop) * p.batch_size
  return 4 * 4 * queries * supports  # logits, softmax, their gradients


def estimate(config, precision):
  by_type, largest, parameters = saved_activations(config, precision)
  activations = sum(by_type.values())
  inputs = sum(n * size * size * 3 * 4 for n, size in step_shapes(config))
  # float32 weights, their gradients and the LARS momentum; a 16-bit copy of the weights under mixed precision
  weights = parameters * 4 * 3 + (parameters * 2 if precision != "float32" else 0)
  rows = {
    "saved activations": activations,
    "backward buffers (2 x largest activation)": 2 * largest,
    "input batch (float32)": inputs,
    "weights, gradients, momentum": weights,
    "PAWS loss matrices": loss_bytes(config),
  }
  return rows, by_type


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; settings are flags (--config.FIELD=VALUE)")
  config = _CONFIG.value
  p, m = config.pretrain, config.model
  groups = " + ".join(f"{n} x {size} px" for n, size in step_shapes(config))
  trunk = "ResNet-50" if m.name == "resnet50" else f"WRN-{m.depth}-{m.width}"
  print(f"{config.name}: {trunk}, one PAWS step on one device: {groups} crops")
  for precision in _PRECISIONS.value:
    rows, by_type = estimate(config, precision)
    total = sum(rows.values())
    print(f"\n{precision}: estimated peak {total / GIB:.1f} GiB")
    for name, size in rows.items():
      print(f"  {name:45s} {size / GIB:6.2f} GiB")
    print(
      "  saved activations by producing op: "
      + ", ".join(f"{op} {size / GIB:.2f}" for op, size in by_type.most_common(6))
    )
    # utils/model/encoder.Conv2D pads explicitly (symmetric, as the reference) before a 'valid' conv: the padded
    # copies are kept for the backward pass unless a compiler folds the zero padding into the convolution
    # (XLA's algebraic simplifier does), which would save them.
    print(
      f"  without the padded copies (if XLA folds the pads into the convolutions): "
      f"{(total - by_type['Pad']) / GIB:.1f} GiB"
    )
  print(
    f"\nAn estimate from the traced graph (batch {p.batch_size}, {p.images_per_class} supports x "
    f"{p.classes_per_batch} classes x {p.support_views} views): cuDNN workspaces, allocator "
    "fragmentation and XLA's fusions are not counted."
  )


if __name__ == "__main__":
  cli.run_script(main)
