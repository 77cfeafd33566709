"""Schedule values and LARS exclusions (METHOD.md section 5)."""
import math

import ml_collections
import numpy as np
import pytest

from utils import encoder as encoder_lib
from utils import optim


def test_warmup_cosine_schedule_values():
  warmup, total = 1950, 117000  # 10 and 600 epochs of 195 steps
  schedule = optim.warmup_cosine_schedule(0.8, 3.2, 0.032, warmup, total)
  assert float(schedule(0)) == pytest.approx(0.8)
  assert float(schedule(warmup // 2)) == pytest.approx(2.0, rel=1e-4)
  assert float(schedule(warmup)) == pytest.approx(3.2)
  assert float(schedule(total - 1)) == pytest.approx(0.032, rel=1e-4)
  middle = warmup + (total - 1 - warmup) // 2
  expected = 0.032 + 0.5 * (3.2 - 0.032) * (1 + math.cos(math.pi * 0.5))
  assert float(schedule(middle)) == pytest.approx(expected, rel=1e-3)
  values = [float(schedule(s)) for s in range(warmup, total, 997)]
  assert all(a >= b for a, b in zip(values, values[1:]))


def test_no_warmup_schedule_starts_at_peak():
  schedule = optim.warmup_cosine_schedule(0.0, 0.1, 0.01, 0, 180)
  assert float(schedule(0)) == pytest.approx(0.1)
  assert float(schedule(179)) == pytest.approx(0.01, rel=1e-4)


def tiny_encoder(prediction_head):
  model = ml_collections.ConfigDict(dict(depth=10, width=1, hidden_dim=16, projection_dim=8,
                                         prediction_head=prediction_head, prediction_hidden_dim=4))
  return encoder_lib.build_encoder(model, 8)


@pytest.mark.parametrize("prediction_head", [False, True])
def test_lars_excludes_exactly_biases_and_batchnorm(prediction_head):
  encoder = tiny_encoder(prediction_head)
  optimizer = optim.build_lars(0.1, 0.9, 1e-6, 0.001)
  names = [v.name for v in encoder.trainable_variables]
  for name in names:
    is_bias_or_bn = name.endswith("bias:0") or name.endswith("gamma:0") or name.endswith("beta:0")
    assert optimizer._use_weight_decay(name) is (not is_bias_or_bn), name
    assert optimizer._do_layer_adaptation(name) is (not is_bias_or_bn), name
  assert sum(n.endswith("kernel:0") for n in names) > 0
  assert sum(n.endswith("gamma:0") for n in names) > 0


def test_lars_update_matches_hand_computation():
  import tensorflow as tf
  kernel = tf.Variable([[3.0, 4.0]], name="dense/kernel")
  bias = tf.Variable([1.0, -1.0], name="dense/bias")
  optimizer = optim.build_lars(0.5, 0.9, 0.1, 0.001)
  grad_kernel, grad_bias = tf.constant([[0.6, 0.8]]), tf.constant([0.2, 0.0])
  optimizer.apply_gradients([(grad_kernel, kernel), (grad_bias, bias)])
  g = np.array([[0.6, 0.8]]) + 0.1 * np.array([[3.0, 4.0]])  # coupled L2 decay
  trust = 0.001 * 5.0 / np.linalg.norm(g)
  np.testing.assert_allclose(kernel.numpy(), [[3.0, 4.0]] - 0.5 * trust * g, rtol=1e-6)
  np.testing.assert_allclose(bias.numpy(), [1.0 - 0.5 * 0.2, -1.0], rtol=1e-6)  # raw lr, no decay
