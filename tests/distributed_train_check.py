"""Runs utils.train.steps.paws_steps on one device and on two mirrored CPU replicas.

Used by tests/test_distributed.py in a subprocess, because the two logical CPU
devices must be configured before TensorFlow initialises.

  python -m tests.distributed_train_check OUTPUT.npz      (from the repository root)

Three runs start from the same weights and take the same global batch:
  single          OneDeviceStrategy, synchronized_bn=False (what training uses
                  on one device; tf_keras picks its fused kernel for the conv BNs)
  single_unfused  the same with every BN forced onto the non-fused kernel, the
                  one tf_keras' synchronized BN always uses
  mirrored        MirroredStrategy over two logical CPUs, synchronized_bn=True
After each step the script saves the reported metrics and every encoder
variable, for the mirrored run once per replica. Keys:
  step0/initial/{i}, names/{i}, conv_bn/{i} (variable of a BN on 4-D inputs),
  step{n}/{run}/metric/{name}, step{n}/{run}{replica}/{trainable|moving}/{i}
with replica "" for the single-device runs and 0, 1 for mirrored, and
relu_margin (see there) for the forward passes of steps 1 and 2.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf
import tf_keras

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import config as config_lib  # pylint: disable=g-import-not-at-top
from tests import replica_input
from utils import devices
from utils.model import encoder as encoder_lib
from utils.train import loop as train_loop
from utils.train import optim, steps

NUM_STEPS = 2
METRICS = ("loss", "ce", "me_max")
# Seed of the random global batch. Chosen so that no BatchNorm output (every BN
# of the encoder feeds a ReLU) lies within 1e-5 of 0 in either step (the
# smallest are 2.75e-5 and 2.93e-5); see relu_margin. The initial weights come
# from config.seed (and utils/model/encoder.py's initialisers), the second step's from
# the first update, which depends on the support labels: changing the config
# needs a new seed.
DATA_SEED = 54


def tiny_config():
  config = config_lib.get_config("digits")
  with config.unlocked():
    config.data.image_size = 8
    config.data.large_crop_size = 8
    config.data.small_crop_size = 5
    config.model.depth = 10
    config.model.width = 1
    config.model.hidden_dim = 16
    config.model.projection_dim = 16
    config.pretrain.batch_size = 4
    config.pretrain.multicrop = 2
    # 3 images of 2 classes: the 6 rows split 3 and 3 between 2 replicas, so a replica holds 2 images
    # of one class and 1 of the other (the split is by rows, not by class).
    config.pretrain.classes_per_batch = 2
    config.pretrain.images_per_class = 3
    config.pretrain.support_views = 2
    config.run.precision = "float32"
    config.run.jit_compile = "false"
  return config


def global_batch(config, seed=0):
  """One global batch: (views tuple, supports [V, K * images_per_class, S, S, 3], rows interleaved by class)."""
  p, d = config.pretrain, config.data
  rng = np.random.default_rng(seed)
  normal = lambda *shape: tf.constant(rng.standard_normal(shape).astype(np.float32))
  views = tuple(normal(p.batch_size, d.large_crop_size, d.large_crop_size, 3) for _ in range(2)) + tuple(
    normal(p.batch_size, d.small_crop_size, d.small_crop_size, 3) for _ in range(p.multicrop)
  )
  supports = normal(p.support_views, p.classes_per_batch * p.images_per_class, d.large_crop_size, d.large_crop_size, 3)
  return views, supports


def relu_margin(config, weights, batch):
  """Smallest |BatchNorm output| in the step's forward pass from `weights`.

  Every BN output goes through a ReLU. An entry within float rounding of 0
  (about 1e-6 here) gets ReLU slope 0 in one implementation and 1 in another,
  and with a batch this small that single entry moves the trunk's gradients
  by percents. Such inputs cannot test equality, so the batch seed is chosen
  to keep every entry at least 1e-5 away from the kink.
  """
  views, supports = batch
  encoder = encoder_lib.build_encoder(config.model, config.data.image_size)
  encoder.set_weights(weights)
  smallest = []
  for layer in encoder.submodules:
    if isinstance(layer, tf_keras.layers.BatchNormalization):
      call = layer.call

      def recording_call(inputs, *args, _call=call, **kwargs):
        outputs = _call(inputs, *args, **kwargs)
        smallest.append(float(tf.reduce_min(tf.abs(outputs))))
        return outputs

      layer.call = recording_call
  size = config.data.large_crop_size
  supports = tf.reshape(supports, [-1, size, size, 3])
  encoder_lib.embed_views(encoder, [[supports, views[0], views[1]], list(views[2:])], training=True)
  return min(smallest)


def run(config, strategy, initial_weights, batch, unfused=False):
  """Builds encoder + LARS under `strategy`, loads the weights, takes NUM_STEPS steps.

  Returns one dict per step: metric name -> float and, per encoder variable,
  (kind, [value on each replica]).
  """
  p = config.pretrain
  # Warm-up then cosine: the two steps use different learning rates.
  schedule = optim.warmup_cosine_schedule(0.05, 0.2, 0.02, 1, 4)

  def make_encoder():
    encoder = encoder_lib.build_for_strategy(config, strategy)
    encoder.set_weights(initial_weights)
    return encoder

  make_optimizer = lambda: optim.build_lars(schedule, p.momentum, p.weight_decay, p.lars_eta, config.run.precision)
  state = train_loop.create_train_state(strategy, make_encoder, make_optimizer)
  encoder, optimizer = state.model, state.optimizer
  bn_layers = [layer for layer in encoder.submodules if isinstance(layer, tf_keras.layers.BatchNormalization)]
  assert bn_layers and all(layer.synchronized == (strategy.num_replicas_in_sync > 1) for layer in bn_layers)
  if unfused:
    for layer in bn_layers:
      layer.fused = False  # read at call time; the variables are the same either way
  trainable = {id(v) for v in encoder.trainable_weights}
  train_steps = steps.paws_steps(config, strategy, encoder, optimizer, jit_compile=False)
  # Every replica gets its share of the global batch, as from the input pipeline.
  iterator = replica_input.repeated(strategy, batch)
  records = []
  for _ in range(NUM_STEPS):
    metrics = train_steps(iterator, tf.constant(1))
    record = {key: float(metrics[key]) for key in METRICS}
    record["variables"] = [
      (
        "trainable" if id(v) in trainable else "moving",
        v.name,
        [np.asarray(local.numpy()) for local in strategy.experimental_local_results(v)],
      )
      for v in encoder.weights
    ]
    records.append(record)
  return records


def main(output_path):
  config = tiny_config()
  devices.set_precision(config)
  tf_keras.utils.set_random_seed(config.seed)  # Python, NumPy and TF: reproducible initial weights
  batch = global_batch(config, DATA_SEED)
  # All runs start from these values (trainable weights and BN moving statistics).
  template = encoder_lib.build_encoder(config.model, config.data.image_size)
  initial_weights = template.get_weights()
  conv_bn = set()
  for layer in template.submodules:
    if isinstance(layer, tf_keras.layers.BatchNormalization) and layer.input_spec.ndim == 4:
      conv_bn.update(id(v) for v in layer.weights)

  single = tf.distribute.OneDeviceStrategy("/cpu:0")
  mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  assert mirrored.num_replicas_in_sync == 2
  runs = {
    "single": run(config, single, initial_weights, batch),
    "single_unfused": run(config, single, initial_weights, batch, unfused=True),
    "mirrored": run(config, mirrored, initial_weights, batch),
  }

  arrays = {}
  # Step 1 runs from the initial weights, step 2 from the weights after step 1.
  after_first = [values[0] for _, _, values in runs["single"][0]["variables"]]
  arrays["relu_margin"] = np.array(
    [relu_margin(config, initial_weights, batch), relu_margin(config, after_first, batch)]
  )
  for index, (variable, value) in enumerate(zip(template.weights, initial_weights)):
    arrays[f"step0/initial/{index:03d}"] = value
    arrays[f"names/{index:03d}"] = np.array(variable.name)
    arrays[f"conv_bn/{index:03d}"] = np.array(id(variable) in conv_bn)
  for name, records in runs.items():
    for step, record in enumerate(records, start=1):
      for key in METRICS:
        arrays[f"step{step}/{name}/metric/{key}"] = np.float64(record[key])
      for index, (kind, variable_name, values) in enumerate(record["variables"]):
        assert variable_name == str(arrays[f"names/{index:03d}"]), (variable_name, index)
        replicas = [""] if len(values) == 1 else [str(r) for r in range(len(values))]
        for replica, value in zip(replicas, values):
          arrays[f"step{step}/{name}{replica}/{kind}/{index:03d}"] = value
  np.savez(output_path, **arrays)
  print(f"wrote {len(arrays)} arrays to {output_path}")


if __name__ == "__main__":
  main(sys.argv[1])
