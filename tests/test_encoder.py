"""WideResNet trunk, heads and BatchNorm momentum (METHOD.md section 3)."""
import ml_collections
import numpy as np
import tensorflow as tf
import tf_keras

from utils import encoder as encoder_lib


def config(depth=28, width=2, prediction_head=False):
  return ml_collections.ConfigDict(dict(depth=depth, width=width, hidden_dim=128, projection_dim=128,
                                        prediction_head=prediction_head, prediction_hidden_dim=32))


def test_wrn_28_2_parameter_counts():
  encoder = encoder_lib.build_encoder(config(), 32)
  # conv3x3(3->16) + 12 pre-activation blocks (32, 64, 128) + final BN, all convs with bias
  assert encoder_lib.count_parameters(encoder.trunk) == 1_468_352
  # 3 Dense 128->128 (with bias) + 2 BN of 128: 3 * 16512 + 2 * 256
  assert encoder_lib.count_parameters(encoder.projection) == 50_048
  with_prediction = encoder_lib.build_encoder(config(prediction_head=True), 32)
  # BN(128) + Dense 128->32 + BN(32) + Dense 32->128
  assert encoder_lib.count_parameters(with_prediction.prediction) == 256 + 4128 + 64 + 4224


def test_outputs_and_bn_momentum_translation():
  encoder = encoder_lib.build_encoder(config(depth=10, width=1, prediction_head=True), 16)
  h, z = encoder(tf.zeros([3, 16, 16, 3]), training=False)
  assert h.shape == (3, 128) and z.shape == (3, 128)
  momenta = {layer.name: layer.momentum for layer in encoder.submodules
             if isinstance(layer, tf_keras.layers.BatchNormalization)}
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
  encoder_lib.save_encoder(encoder, full, str(tmp_path / "enc"), 5)
  loaded, meta = encoder_lib.load_encoder(str(tmp_path / "enc"), full, "paws_train.py")
  x = tf.random.normal([2, 8, 8, 3])
  np.testing.assert_allclose(loaded(x, training=False)[0].numpy(), encoder(x, training=False)[0].numpy(), atol=1e-6)
  assert meta["pretrain_step"] == 5
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
  np.testing.assert_allclose(encoder.trunk(varied, training=False).numpy(),
                             encoder.trunk(varied, training=True).numpy(), rtol=1e-2, atol=1e-3)


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
