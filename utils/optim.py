"""Learning-rate schedule and LARS optimizer (METHOD.md sections 5 and 6)."""
import tf_keras
from official.modeling.optimization import lars

# Matched with re.search against variable names: every Dense/Conv bias is
# '.../bias:0' and every BatchNorm layer of utils.encoder is named 'bn*' or
# 'final_bn' (variables 'bn1/gamma:0', 'bn_in/beta:0', 'final_bn/gamma:0').
LARS_EXCLUDE = [r"bias", r"(^|/)(bn\w*|final_bn)/(gamma|beta)"]


def warmup_cosine_schedule(start_lr, peak_lr, final_lr, warmup_steps, total_steps):
  """Linear warm-up start_lr -> peak_lr over warmup_steps, then cosine to final_lr.

  The last step (total_steps - 1) gets exactly final_lr. tf_keras' CosineDecay
  already has the linear warm-up, so no custom schedule class is needed.
  """
  decay_steps = max(total_steps - 1 - warmup_steps, 1)
  return tf_keras.optimizers.schedules.CosineDecay(
      initial_learning_rate=start_lr if warmup_steps else peak_lr,
      decay_steps=decay_steps,
      alpha=final_lr / peak_lr,
      warmup_target=peak_lr if warmup_steps else None,
      warmup_steps=warmup_steps)


def build_lars(learning_rate, momentum, weight_decay, eta, precision="float32"):
  """Model Garden LARS over SGD momentum (no Nesterov), coupled L2 weight decay.

  Biases and BatchNorm parameters are excluded from both the trust-ratio
  adaptation and the weight decay. Under mixed_float16 the optimizer is wrapped
  in the Keras dynamic loss-scale optimizer.
  """
  optimizer = lars.LARS(
      learning_rate=learning_rate, momentum=momentum, weight_decay_rate=weight_decay,
      eeta=eta, nesterov=False, classic_momentum=True,
      exclude_from_weight_decay=LARS_EXCLUDE, exclude_from_layer_adaptation=LARS_EXCLUDE)
  if precision == "mixed_float16":
    optimizer = tf_keras.mixed_precision.LossScaleOptimizer(optimizer)
  return optimizer

