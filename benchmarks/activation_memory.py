"""Estimated GPU memory of one PAWS train step at a preset's shapes, from the activations the backward pass keeps.

Traces (never runs: no memory is used) the encoder's forward and backward pass on the step's two view
groups, as utils/steps.paws_steps embeds them: supports + 2 large views at the large crop size, the small
crops at the small crop size. Every tensor the forward pass produces and the backward pass reads is an
activation saved for the backward pass (a conv's input, a BatchNorm's input, a ReLU's output, ...); their
sizes come from the traced graph's static shapes and dtypes (16-bit in the trunk under mixed_float16, the
heads in float32). The estimate adds the input batch, the weights, their gradients and the LARS momentum,
the PAWS loss's similarity matrices and, for the backward pass itself, two gradient buffers of the largest
activation. It leaves out cuDNN workspaces and allocator fragmentation, and XLA or Grappler rewrites that
recompute or fuse activations: an estimate, not a measurement.

  python benchmarks/activation_memory.py [--config cifar10] [--precision float32 mixed_float16]

On one GPU the whole global batch is one replica's; with N replicas divide the activations by N.
"""

import argparse
import collections
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tracing only: no device memory needed
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import tensorflow as tf  # pylint: disable=g-import-not-at-top
import tf_keras

import config as presets  # pylint: disable=g-import-not-at-top
from utils import encoder as encoder_lib

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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="cifar10", choices=sorted(presets.PRESETS))
  parser.add_argument("--precision", nargs="+", default=["float32", "mixed_float16"])
  args = parser.parse_args()
  config = presets.get_config(args.config)
  p, m = config.pretrain, config.model
  groups = " + ".join(f"{n} x {size} px" for n, size in step_shapes(config))
  print(f"{args.config}: WRN-{m.depth}-{m.width}, one PAWS step on one device: {groups} crops")
  for precision in args.precision:
    rows, by_type = estimate(config, precision)
    total = sum(rows.values())
    print(f"\n{precision}: estimated peak {total / GIB:.1f} GiB")
    for name, size in rows.items():
      print(f"  {name:45s} {size / GIB:6.2f} GiB")
    print(
      "  saved activations by producing op: "
      + ", ".join(f"{op} {size / GIB:.2f}" for op, size in by_type.most_common(6))
    )
    # utils/encoder.Conv2D pads explicitly (symmetric, as the reference) before a 'valid' conv: the padded
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
  main()
