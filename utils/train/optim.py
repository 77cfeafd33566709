"""Learning-rate schedule and LARS optimizer (METHOD.md sections 5 and 6)."""

import math
import re

from official.modeling.optimization import lars
import tensorflow as tf
import tf_keras

# The reference's parameter groups (its paws_train.init_opt): a parameter whose PyTorch name contains 'bias'
# or 'bn' takes plain SGD momentum, without LARS adaptation and without weight decay; every other one takes
# both. In the reference's names that excludes every Linear/Conv bias and every BatchNorm offset ('*.bias'),
# and the scale ('*.weight') of every BatchNorm named bn*: the WideResNet's bn1/bn2 and final bn1, the
# ResNet's stem bn1 and bottleneck bn1..bn3, the heads' fc.bn1, fc.bn2, pred.bn1, pred.bn2. torchvision names
# the ResNet's shortcut BatchNorm `downsample.1`: its scale has neither 'bias' nor 'bn' in its name, so the
# reference gives it LARS and weight decay (4 tensors in ResNet-50, 3 840 scalars). Here the same tensors are
# found by their TensorFlow names (re.search, as Model Garden's LARS matches them): biases '.../bias', BN
# offsets '.../beta', and the gamma of the BN layers named bn* or final_bn other than utils/model/resnet.py's
# 'bn_shortcut'. No anchor at the end: under MirroredStrategy a replica's copy is named '.../bias/replica_1:0'.
# tests/test_lars_groups.py checks the two groups tensor by tensor against the reference's parameter names.
LARS_EXCLUDE = [r"(^|/)bias\b", r"(^|/)beta\b", r"(^|/)(?!bn_shortcut/)(bn\w*|final_bn)/gamma\b"]


def excluded_from_lars(variable_name: str) -> bool:
  """Whether the variable takes plain SGD momentum without LARS or weight decay (the reference's rule, above)."""
  return any(re.search(pattern, variable_name) for pattern in LARS_EXCLUDE)


class WarmupCosineSchedule(tf_keras.optimizers.schedules.LearningRateSchedule):
  """The reference's per-update learning rate (METHOD.md section 5), computed in float64.

  Update k (0-based; the legacy Keras optimizers call the schedule with their
  update count before incrementing it, as the reference's LambdaLR steps after
  each update) gets
    start_lr + k / warmup_steps * (peak_lr - start_lr)            if k < warmup_steps,
    final_lr + (peak_lr - final_lr) / 2 * (1 + cos(pi * (k - warmup_steps) / (total_steps - warmup_steps)))
  otherwise. The cosine runs over total_steps - warmup_steps updates, so the
  last update (total_steps - 1) is still slightly above final_lr, as in the
  reference. tf_keras' CosineDecay has the same warm-up (step 0 = start_lr)
  and, with decay_steps = total_steps - warmup_steps, the same formula, but it
  computes in float32: cos near pi loses up to 2e-6 of the rate late in the
  decay. float64 here, rounded to float32 at the end, gives the reference's
  values to float32 rounding.
  """

  def __init__(self, start_lr, peak_lr, final_lr, warmup_steps, total_steps):
    super().__init__()
    self.start_lr, self.peak_lr, self.final_lr = float(start_lr), float(peak_lr), float(final_lr)
    self.warmup_steps, self.total_steps = int(warmup_steps), int(total_steps)

  def __call__(self, step):
    step = tf.cast(step, tf.float64)
    warmup = tf.constant(float(self.warmup_steps), tf.float64)
    warmup_lr = self.start_lr + step / max(self.warmup_steps, 1) * (self.peak_lr - self.start_lr)
    # Past total_steps the cosine would climb back up; hold final_lr there instead (never reached in training).
    progress = tf.minimum((step - warmup) / max(self.total_steps - self.warmup_steps, 1), 1.0)
    cosine_lr = self.final_lr + 0.5 * (self.peak_lr - self.final_lr) * (1 + tf.cos(math.pi * progress))
    return tf.cast(tf.where(step < warmup, warmup_lr, cosine_lr), tf.float32)

  def get_config(self):
    return dict(
      start_lr=self.start_lr,
      peak_lr=self.peak_lr,
      final_lr=self.final_lr,
      warmup_steps=self.warmup_steps,
      total_steps=self.total_steps,
    )


def warmup_cosine_schedule(
  start_lr: float, peak_lr: float, final_lr: float, warmup_steps: int, total_steps: int
) -> WarmupCosineSchedule:
  """Linear warm-up start_lr -> peak_lr over warmup_steps, then cosine towards final_lr (WarmupCosineSchedule)."""
  return WarmupCosineSchedule(start_lr, peak_lr, final_lr, warmup_steps, total_steps)


def build_lars(learning_rate, momentum: float, weight_decay: float, eta: float, precision: str = "float32"):
  """Model Garden LARS over SGD momentum (no Nesterov), coupled L2 weight decay.

  Biases, BatchNorm offsets and the BatchNorm scales the reference names bn* (all but the ResNet's
  shortcut BN: LARS_EXCLUDE) are excluded from both the trust-ratio adaptation and the weight decay.
  Under mixed_float16 the optimizer is wrapped
  in the Keras dynamic loss-scale optimizer.
  """
  optimizer = lars.LARS(
    learning_rate=learning_rate,
    momentum=momentum,
    weight_decay_rate=weight_decay,
    eeta=eta,
    nesterov=False,
    classic_momentum=True,
    exclude_from_weight_decay=LARS_EXCLUDE,
    exclude_from_layer_adaptation=LARS_EXCLUDE,
  )
  return loss_scaled(optimizer, precision)


def build_sgd(learning_rate, momentum: float, precision: str = "float32"):
  """SGD with Nesterov momentum (tf_keras legacy, as LARS), loss-scaled under mixed_float16.

  tf_keras: v <- momentum v - lr g; w <- w + momentum v - lr g. PyTorch keeps v <- momentum v + g and
  steps w <- w - lr (g + momentum v): the same update while lr is constant, and the first step is the
  same whatever the rate; under the cosine the two differ by the change of lr between steps.
  """
  optimizer = tf_keras.optimizers.legacy.SGD(learning_rate=learning_rate, momentum=momentum, nesterov=True)
  return loss_scaled(optimizer, precision)


def loss_scaled(optimizer, precision: str):
  """The optimizer, wrapped in tf_keras' dynamic loss-scale optimizer under mixed_float16."""
  if precision == "mixed_float16":
    return tf_keras.mixed_precision.LossScaleOptimizer(optimizer)
  return optimizer


def create_slots(optimizer, variables) -> None:
  """Creates the optimizer's slot variables (momentum) for `variables` now, inside the strategy's scope.

  They must exist before a checkpoint restore (else their values are deferred and the first step creates
  fresh ones) and before the step is traced (else the first call creates them and the function is traced
  twice). tf_keras' legacy optimizers (Model Garden's LARS is one) create them lazily and have no public
  method for it: this is the project's only call of a private method.
  """
  optimizer._create_all_weights(variables)  # pylint: disable=protected-access


def decayed_variables(model: tf_keras.Model) -> list[tf.Variable]:
  """The variables weight decay applies to: the reference's decayed group (LARS_EXCLUDE), for any model."""
  return [v for v in model.trainable_variables if not excluded_from_lars(v.name)]
