"""Learning-rate schedule and LARS updates against NumPy oracles (METHOD.md sections 5 and 6)."""

import math

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from utils.model import encoder as encoder_lib
from utils.train import optim


def reference_lr(update, start_lr, peak_lr, final_lr, warmup_steps, total_steps):
  """The reference's WarmupCosineSchedule lambda at LambdaLR step `update` (the 0-based update index)."""
  if update < warmup_steps:
    return start_lr + update / max(1, warmup_steps) * (peak_lr - start_lr)
  progress = (update - warmup_steps) / max(1, total_steps - warmup_steps)
  return max(final_lr, final_lr + (peak_lr - final_lr) * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize(
  "start_lr,peak_lr,final_lr,warmup_steps,total_steps",
  [
    (0.8, 3.2, 0.032, 1950, 117000),  # pre-training: 10 warm-up epochs of 600, 195 steps each
    (0.0, 0.1, 0.01, 0, 180),  # fine-tuning: 30 epochs of 6 steps, no warm-up
  ],
)
def test_schedule_matches_the_reference_at_every_update(start_lr, peak_lr, final_lr, warmup_steps, total_steps):
  schedule = optim.warmup_cosine_schedule(start_lr, peak_lr, final_lr, warmup_steps, total_steps)
  updates = np.arange(total_steps)
  ours = schedule(tf.constant(updates, tf.int64)).numpy()
  expected = np.array([reference_lr(k, start_lr, peak_lr, final_lr, warmup_steps, total_steps) for k in updates])
  np.testing.assert_allclose(ours[:warmup_steps], expected[:warmup_steps], rtol=1e-6)  # warm-up
  np.testing.assert_allclose(ours[warmup_steps:], expected[warmup_steps:], rtol=1e-6)  # cosine
  assert ours[0] == pytest.approx(start_lr if warmup_steps else peak_lr)
  assert ours[warmup_steps] == pytest.approx(peak_lr)
  # The cosine spans total - warmup updates: the last update is still above final_lr (fine-tuning:
  # 0.0100069; pre-training: 0.032 + 6e-10, below float32 resolution).
  last_progress = (total_steps - 1 - warmup_steps) / (total_steps - warmup_steps)
  assert ours[-1] == pytest.approx(final_lr + 0.5 * (peak_lr - final_lr) * (1 + math.cos(math.pi * last_progress)))
  assert float(schedule(total_steps + 50)) == pytest.approx(final_lr)  # held after the end


def tiny_encoder(prediction_head):
  model = ml_collections.ConfigDict(
    dict(
      name="wrn",
      depth=10,
      width=1,
      hidden_dim=16,
      projection_dim=8,
      prediction_head=prediction_head,
      prediction_hidden_dim=4,
    )
  )
  return encoder_lib.build_encoder(model, 8)


def is_bias_or_batch_norm(variable):
  layer_name, variable_name = variable.name.split("/")[-2:]
  return (
    variable_name == "bias:0" or variable_name in ("gamma:0", "beta:0") and layer_name.startswith(("bn", "final_bn"))
  )


@pytest.mark.parametrize("prediction_head", [False, True])
def test_one_lars_step_on_the_encoder(prediction_head):
  """Biases and BN parameters take -lr * g; every other variable the Model Garden LARS step."""
  learning_rate, weight_decay, eta = 0.5, 0.1, 0.001
  encoder = tiny_encoder(prediction_head)
  variables = encoder.trainable_variables
  before = [v.numpy().astype(np.float64) for v in variables]
  rng = np.random.default_rng(0)
  gradients = [rng.normal(size=v.shape).astype(np.float32) for v in variables]
  optimizer = optim.build_lars(learning_rate, 0.9, weight_decay, eta)
  optimizer.apply_gradients(zip([tf.constant(g) for g in gradients], variables))  # momentum slots start at 0
  kinds = {True: 0, False: 0}
  for variable, weights, gradient in zip(variables, before, gradients):
    excluded = is_bias_or_batch_norm(variable)
    kinds[excluded] += 1
    if excluded:  # raw learning rate, no weight decay, no trust ratio
      expected = weights - learning_rate * gradient
    else:  # coupled L2, then the trust ratio eta * ||w|| / ||g + wd w||
      decayed = gradient + weight_decay * weights
      expected = weights - learning_rate * eta * np.linalg.norm(weights) / np.linalg.norm(decayed) * decayed
    np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-5, atol=1e-7, err_msg=variable.name)
  assert kinds[True] > 0 and kinds[False] > 0
  # The encoder's own names: a conv kernel adapts, its bias and a BN gamma do not.
  names = [v.name for v in variables]
  assert any(n.endswith("conv2/kernel:0") for n in names) and any(n.endswith("final_bn/gamma:0") for n in names)


def test_lars_follows_the_schedule_and_momentum():
  """Update k uses schedule(k); the second update carries 0.9 of the first (SGD momentum, lr inside)."""
  dense = encoder_lib.Dense(3, name="dense1")
  batch_norm = encoder_lib.batch_norm("bn1")
  model = tf_keras.Sequential([dense, batch_norm])
  model(tf.zeros([2, 4]))
  kernel, bias, gamma = dense.kernel, dense.bias, batch_norm.gamma
  schedule = optim.warmup_cosine_schedule(0.1, 0.5, 0.01, 4, 10)  # updates 0, 1 at 0.1, 0.2
  optimizer = optim.build_lars(schedule, 0.9, 1e-3, 0.01)
  rng = np.random.default_rng(1)
  steps = [[rng.normal(size=v.shape).astype(np.float32) for v in (kernel, bias, gamma)] for _ in range(2)]
  values = [[v.numpy().astype(np.float64) for v in (kernel, bias, gamma)]]
  for gradients in steps:
    optimizer.apply_gradients(zip([tf.constant(g) for g in gradients], [kernel, bias, gamma]))
    values.append([v.numpy().astype(np.float64) for v in (kernel, bias, gamma)])
  for index in (1, 2):  # bias and BN gamma: plain SGD momentum at the raw scheduled rate
    first = 0.1 * steps[0][index]
    np.testing.assert_allclose(values[1][index], values[0][index] - first, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
      values[2][index], values[1][index] - (0.9 * first + 0.2 * steps[1][index]), rtol=1e-6, atol=1e-7
    )
  velocity = np.zeros_like(values[0][0])
  for step, learning_rate in enumerate((0.1, 0.2)):
    weights = values[step][0]
    decayed = steps[step][0] + 1e-3 * weights
    velocity = 0.9 * velocity + learning_rate * 0.01 * np.linalg.norm(weights) / np.linalg.norm(decayed) * decayed
    np.testing.assert_allclose(values[step + 1][0], weights - velocity, rtol=1e-6, atol=1e-7)
