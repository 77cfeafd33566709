"""The multi-GPU configuration (XLA, mixed_float16 loss scaling, mirrored replicas) rehearsed on 2 logical CPUs.

On GPUs, run.jit_compile=auto compiles the step with XLA, run.precision=auto trains in mixed_float16 with
dynamic loss scaling, and several GPUs mean MirroredStrategy with synchronized BatchNorm and all-gathered
supports. MirroredStrategy runs a jit-compiled replica function one of two ways (tensorflow/python/
distribute/mirrored_run.py, call_for_each_replica):
  whole GPUs   one XLA program per replica; cross-replica sums are collective ops compiled into it (NCCL),
               merge_call is not allowed;
  otherwise    one XLA program around all replicas, which cannot use variables on several devices.
No CPU runs the first: XLA refuses collectives on CPU devices ("Collectives are not yet implemented for CPU
devices when compiling with XLA"), so XLA with several replicas cannot execute here, and
devices.setup_training turns it off for CPU replicas. What this file checks instead:
  * the real PAWS and SuNCEt steps, 2 replicas, float32 and mixed_float16, traced on the GPU route (TensorFlow
    told the 2 CPUs are GPUs: gpu_route): one XLA function per replica, collectives inside, no merge_call;
    running it stops only at the CPU collectives. ReplicaContext.all_gather fails on that route (it always
    merge_calls): utils.steps.all_gather replaces it and equals it, values and gradients;
  * the XLA step itself on one replica (no collectives): equal to the plain step (float32: metrics and
    weights within float tolerance; mixed_float16: the 5 % of tests/test_steps.py), several steps per call,
    a loss-scale overflow inside the XLA step skips the update and halves the scale;
  * a checkpoint written by the 2-replica mixed_float16 run restores into the 1-replica XLA run and continues;
  * run.cpu_replicas: the logical devices, the strategy, XLA off with a reason, errors.
Everything runs in two subprocesses (`python -m tests.test_xla_replicas replicas|xla OUTPUT.npz FOLDER` from the
repository root, see main): logical devices must be configured before TensorFlow initialises, and the precision
policy is process-wide.

Float32 tolerances, as in tests/test_distributed.py (which explains the update check and why the inputs must
keep every BatchNorm output away from the ReLU kink, see MIN_RELU_MARGIN): metrics relative 1e-5 (loss
relative to |ce| + |me_max|); weights rtol 1e-5, atol 1e-5, and their updates rtol 1e-4 with atol 1e-4 x the
largest update + 1e-6, after step 3 three times wider (differences grow with every step). Observed (PAWS;
SuNCEt is 10x closer): metrics 1.1e-6, 20x below; weights after step 1 at most 1/6 of the tolerance, after
step 3 at most 1/6 of the wider one.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
import time

if __name__ == "__main__":  # the subprocess (python -m tests.test_xla_replicas): before TensorFlow starts
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from tests import replica_input  # pylint: disable=g-import-not-at-top
from utils import cli, devices
from utils.errors import UserError  # pylint: disable=g-import-not-at-top
from utils.model import encoder as encoder_lib
from utils.train import loop as train_loop
from utils.train import optim, steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRECISIONS = ("float32", "mixed_float16")
METRICS = {"paws": ("loss", "ce", "me_max"), "suncet": ("loss",)}
# Learning rates change from step to step (warm-up, then cosine).
SCHEDULE = dict(start_lr=0.05, peak_lr=0.2, final_lr=0.02, warmup_steps=1, total_steps=40)
WEIGHTS_SEED = 0  # initial_weights
# Seeds of the random batches: from the weights of initial_weights(), every BatchNorm output stays at least
# MIN_RELU_MARGIN away from the ReLU kink in steps 1 to 3 (smallest: PAWS 1.1e-5, SuNCEt 6.7e-6). XLA and
# the plain kernels differ by float rounding (about 1e-7 here): an entry nearer the kink could take the
# ReLU's other slope in one of them, which moves a tiny batch's gradients by percents.
PAWS_SEED = 22
SUNCET_SEED = 4
MIN_RELU_MARGIN = 5e-6
OVERFLOW_SCALE = 2.0**40  # scaled gradients overflow float16 (max 65504) for about 20 halvings


# --- The subprocess ---------------------------------------------------------------------------------


@contextlib.contextmanager
def gpu_route():
  """While tracing: MirroredStrategy routes jit-compiled replica functions over the CPUs as over GPUs.

  TensorFlow picks the route by device type (mirrored_run._is_gpu_device, and mirrored_strategy's copy for
  merge_call); the only other reader counts GPUs when a strategy is built, which happens outside this.
  """
  from tensorflow.python.distribute import (
    mirrored_run,  # pylint: disable=g-import-not-at-top
    mirrored_strategy,  # pylint: disable=g-import-not-at-top
  )

  saved = mirrored_run._is_gpu_device, mirrored_strategy._is_gpu_device  # pylint: disable=protected-access
  # pylint: disable=protected-access
  mirrored_run._is_gpu_device = mirrored_strategy._is_gpu_device = lambda device: True
  try:
    yield
  finally:
    mirrored_run._is_gpu_device, mirrored_strategy._is_gpu_device = saved  # pylint: disable=protected-access


_MIRRORED = []


def two_replicas():
  """The process's one MirroredStrategy over the 2 logical CPUs: two instances would reuse collective keys."""
  if not _MIRRORED:
    _MIRRORED.append(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
  return _MIRRORED[0]


def tiny_config(precision, check):
  """tests/distributed_train_check.py's tiny WRN-10-1 config (PAWS and SuNCEt shapes) under `precision`."""
  config = check.tiny_config()
  config.run.precision = precision
  config.finetune.classes_per_batch, config.finetune.images_per_class = 3, 2
  return config


def initial_weights(config, seed=None):
  """Initial encoder weights drawn by NumPy with utils/model/encoder.py's bounds (U(+-1/sqrt(fan_in))).

  Keras' own draws depend on what the process built before, and the batch seeds (MIN_RELU_MARGIN) hold
  for these weights only. BatchNorm starts as Keras builds it (gamma 1, beta 0, mean 0, variance 1).
  """
  tf_keras.mixed_precision.set_global_policy("float32")
  encoder = encoder_lib.build_encoder(config.model, config.data.image_size)
  rng = np.random.default_rng(WEIGHTS_SEED if seed is None else seed)
  weights, bound = [], None
  for variable in encoder.weights:  # every kernel comes right before its bias
    value = variable.numpy()
    if variable.name.endswith("kernel:0"):
      bound = encoder_lib.fan_in_uniform_bound(int(np.prod(value.shape[:-1])))
    if variable.name.endswith(("kernel:0", "bias:0")):
      value = rng.uniform(-bound, bound, value.shape).astype(np.float32)
    weights.append(value)
  return weights


def paws_batch(config, check):
  return check.global_batch(config, PAWS_SEED)


def suncet_batch(config):
  f, size = config.finetune, config.data.image_size
  rng = np.random.default_rng(SUNCET_SEED)
  shape = [f.views, f.classes_per_batch * f.images_per_class, size, size, 3]
  return tf.constant(rng.standard_normal(shape), tf.float32)


def relu_margin(config, weights, inputs, training_mode):
  """Smallest |BatchNorm output| (each feeds a ReLU) of one forward pass of the encoder from `weights`."""
  tf_keras.mixed_precision.set_global_policy("float32")
  encoder = encoder_lib.build_encoder(config.model, config.data.image_size)
  encoder.set_weights(weights)
  smallest = []
  for layer in encoder.submodules:
    if isinstance(layer, tf_keras.layers.BatchNormalization):

      def recording_call(x, *args, _call=layer.call, **kwargs):
        outputs = _call(x, *args, **kwargs)
        smallest.append(float(tf.reduce_min(tf.abs(outputs))))
        return outputs

      layer.call = recording_call
  encoder_lib.embed_views(encoder, inputs, training=training_mode)
  return min(smallest)


def pretrain_groups(config, batch):
  """The view groups paws_steps embeds (supports and large views together, small crops together)."""
  views, supports = batch
  size = config.data.large_crop_size
  return [[tf.reshape(supports, [-1, size, size, 3]), views[0], views[1]], list(views[2:])]


def build_state(config, strategy, weights, loss_scale=None):
  """Encoder (set to `weights`) + LARS under `strategy`; mixed_float16 wraps LARS in a loss-scale optimizer.

  loss_scale: its initial scale (None: tf_keras' default, as training uses).
  """
  tf_keras.mixed_precision.set_global_policy(config.run.precision)
  schedule = optim.warmup_cosine_schedule(*SCHEDULE.values())
  p = config.pretrain
  if loss_scale is None:
    state = train_loop.create_train_state(
      strategy,
      lambda: encoder_lib.build_for_strategy(config, strategy),
      lambda: optim.build_lars(schedule, p.momentum, p.weight_decay, p.lars_eta, config.run.precision),
    )
  else:
    with strategy.scope():
      encoder = encoder_lib.build_encoder(config.model, config.data.image_size)
      optimizer = tf_keras.mixed_precision.LossScaleOptimizer(
        optim.build_lars(schedule, p.momentum, p.weight_decay, p.lars_eta), initial_scale=loss_scale
      )
      optim.create_slots(optimizer, encoder.trainable_variables)
      state = train_loop.TrainState(encoder, optimizer, tf.Variable(0, dtype=tf.int64, name="step"))
  state.model.set_weights(weights)
  return state


def make_steps(kind, config, strategy, state, jit_compile):
  if kind == "paws":
    return steps.paws_steps(config, strategy, state.model, state.optimizer, jit_compile)
  return steps.suncet_steps(config, strategy, state.model, state.optimizer, jit_compile, bn_training=False)


def run_calls(train_steps, strategy, batch, calls):
  """Calls train_steps once per entry of `calls` (steps per call) on a repeated batch; returns the metrics."""
  iterator = replica_input.repeated(strategy, batch)
  return [{k: float(v) for k, v in train_steps(iterator, tf.constant(n)).items()} for n in calls]


def loss_scale(optimizer):
  return float(optimizer.loss_scale)


def first_line(error, *words):
  """The first line of an error message that contains all `words` (else its first line)."""
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  return next((line for line in lines if all(word in line for word in words)), lines[0] if lines else "")


def record_weights(results, prefix, encoder):
  for index, value in enumerate(encoder.get_weights()):
    results[f"{prefix}/{index:03d}"] = value


def gpu_route_traces(check, results):
  """The real steps, 2 replicas, jit_compile=True, traced on the GPU route; the last one run (stops at collectives)."""
  mirrored = two_replicas()
  for kind in ("paws", "suncet"):
    for precision in PRECISIONS:
      config = tiny_config(precision, check)
      weights = initial_weights(config)
      state = build_state(config, mirrored, weights)
      train_steps = make_steps(kind, config, mirrored, state, jit_compile=True)
      batch = paws_batch(config, check) if kind == "paws" else suncet_batch(config)
      iterator = replica_input.repeated(mirrored, batch)
      key = f"gpu_route/{kind}/{precision}"
      with gpu_route():
        concrete = train_steps.get_concrete_function(iterator, tf.constant(1))
      library = concrete.graph.as_graph_def().library.function
      xla = [f for f in library if f.attr["_XlaMustCompile"].b]
      results[f"{key}/xla_functions"] = np.array(len(xla))
      results[f"{key}/collectives_per_xla_function"] = np.array(
        [sum(node.op == "CollectiveReduceV2" for node in f.node_def) for f in xla]
      )
      results[f"{key}/collective_gathers"] = np.array(
        sum(node.op == "CollectiveGatherV2" for f in library for node in f.node_def)
      )
  # Running a step compiles it: the last one traced, once (XLA compiles the two replicas the same way).
  before = [v.numpy() for v in state.model.trainable_variables]
  try:
    train_steps(iterator, tf.constant(1))
    results["gpu_route/run_error"] = np.array("")
  except tf.errors.OpError as error:
    results["gpu_route/run_error"] = np.array(f"{type(error).__name__}: {first_line(error, 'ollective', 'compil')}")
  results["gpu_route/unchanged"] = np.array(
    all(np.array_equal(b, v.numpy()) for b, v in zip(before, state.model.trainable_variables))
  )


def gather_checks(results):
  """ReplicaContext.all_gather against utils.steps.all_gather: on the GPU route, and values and gradients."""
  tf_keras.mixed_precision.set_global_policy("float32")
  mirrored = two_replicas()
  for name, gather in (("tensorflow", lambda replica, x: replica.all_gather(x, axis=0)), ("steps", steps.all_gather)):
    step_fn = tf.function(
      lambda x, _gather=gather: _gather(tf.distribute.get_replica_context(), x) * 2.0, jit_compile=True
    )
    call = tf.function(lambda x, _step=step_fn: mirrored.run(_step, args=(x,)))
    try:
      with gpu_route():
        call.get_concrete_function(tf.TensorSpec([3, 2]))
      results[f"gather/{name}/gpu_route"] = np.array("traced")
    except Exception as error:  # pylint: disable=broad-except
      results[f"gather/{name}/gpu_route"] = np.array(f"{type(error).__name__}: {first_line(error, 'merge_call')}")

  rows = mirrored.experimental_distribute_values_from_function(
    lambda context: tf.reshape(tf.range(6, dtype=tf.float32), [3, 2]) * (context.replica_id_in_sync_group + 1.5)
  )
  weights = tf.constant(np.random.default_rng(0).standard_normal([6, 2]), tf.float32)
  results["gather/weights"] = weights.numpy()

  @tf.function
  def gathered_and_gradient(x):
    def replica_fn(value):
      replica = tf.distribute.get_replica_context()
      outputs = []
      for gather in (lambda v: replica.all_gather(v, axis=0), lambda v: steps.all_gather(replica, v)):
        with tf.GradientTape() as tape:
          tape.watch(value)
          gathered = gather(value)
          objective = tf.reduce_sum(gathered * weights) * tf.cast(replica.replica_id_in_sync_group + 1, tf.float32)
        outputs += [gathered, tape.gradient(objective, value)]
      return outputs

    return mirrored.run(replica_fn, args=(x,))

  for index, value in enumerate(gathered_and_gradient(rows)):
    for replica, local in enumerate(mirrored.experimental_local_results(value)):
      results[f"gather/values/{['tf', 'tf_grad', 'steps', 'steps_grad'][index]}/{replica}"] = local.numpy()


def xla_float32(kind, check, results):
  """XLA against the plain step, one replica, float32: step 1, then 2 steps in one call (3 in all)."""
  config = tiny_config("float32", check)
  tf_keras.mixed_precision.set_global_policy("float32")
  weights = initial_weights(config)
  batch = paws_batch(config, check) if kind == "paws" else suncet_batch(config)
  one = tf.distribute.OneDeviceStrategy("/cpu:0")
  plain_weights = []  # after steps 1 and 2 of the plain run, for relu_margin
  for jit in (False, True):
    state = build_state(config, one, weights)
    train_steps = make_steps(kind, config, one, state, jit_compile=jit)
    iterator = replica_input.repeated(one, batch)
    name = "xla" if jit else "plain"
    start = time.perf_counter()
    first = {k: float(v) for k, v in train_steps(iterator, tf.constant(1)).items()}
    results[f"seconds/{kind}/float32/{name}/first_call"] = np.array(time.perf_counter() - start)
    for metric, value in first.items():
      results[f"{kind}/float32/{name}/step1/{metric}"] = np.array(value)
    record_weights(results, f"{kind}/float32/{name}/step1/weights", state.model)
    if jit:
      train_steps(iterator, tf.constant(2))  # steps 2 and 3 in one compiled call
    else:
      plain_weights.append(state.model.get_weights())
      train_steps(iterator, tf.constant(1))
      plain_weights.append(state.model.get_weights())
      train_steps(iterator, tf.constant(1))
    record_weights(results, f"{kind}/float32/{name}/step3/weights", state.model)
    results[f"{kind}/float32/{name}/iterations"] = np.array(int(state.optimizer.iterations.numpy()))
  for index, value in enumerate(weights):
    results[f"{kind}/initial/{index:03d}"] = value
  inputs = pretrain_groups(config, batch) if kind == "paws" else [[tf.reshape(batch, [-1, 8, 8, 3])]]
  results[f"{kind}/float32/relu_margin"] = np.array(
    [relu_margin(config, w, inputs, kind == "paws") for w in [weights] + plain_weights]
  )


def xla_float16(kind, check, results, checkpoint_dir):
  """mixed_float16, one replica: XLA against the plain step and float32 (step 1), then a forced overflow.

  The XLA state starts at OVERFLOW_SCALE: its first step must leave the weights and LARS slots as they
  were and halve the scale; a call of 30 steps then brings the scale down and trains. For SuNCEt the same
  compiled step then restores the checkpoint of the 2-replica run and continues it.
  """
  config = tiny_config("mixed_float16", check)
  tf_keras.mixed_precision.set_global_policy("float32")
  weights = initial_weights(config)
  batch = paws_batch(config, check) if kind == "paws" else suncet_batch(config)
  one = tf.distribute.OneDeviceStrategy("/cpu:0")

  plain = build_state(config, one, weights)
  for metric, value in run_calls(make_steps(kind, config, one, plain, False), one, batch, [1])[0].items():
    results[f"{kind}/mixed_float16/plain/step1/{metric}"] = np.array(value)

  state = build_state(config, one, weights, loss_scale=OVERFLOW_SCALE)
  train_steps = make_steps(kind, config, one, state, jit_compile=True)
  iterator = replica_input.repeated(one, batch)
  slots = lambda: [v.numpy() for v in state.optimizer.variables() if "momentum" in v.name]
  trainable_before, slots_before = [v.numpy() for v in state.model.trainable_variables], slots()
  start = time.perf_counter()
  first = {k: float(v) for k, v in train_steps(iterator, tf.constant(1)).items()}
  results[f"seconds/{kind}/mixed_float16/xla/first_call"] = np.array(time.perf_counter() - start)
  for metric, value in first.items():
    results[f"{kind}/mixed_float16/xla/step1/{metric}"] = np.array(value)
  results[f"{kind}/overflow/scale_after"] = np.array(loss_scale(state.optimizer))
  results[f"{kind}/overflow/iterations_after"] = np.array(int(state.optimizer.iterations.numpy()))
  results[f"{kind}/overflow/trainable_unchanged"] = np.array(
    all(np.array_equal(b, v.numpy()) for b, v in zip(trainable_before, state.model.trainable_variables))
  )
  results[f"{kind}/overflow/slots_unchanged"] = np.array(
    bool(slots_before) and all(np.array_equal(b, a) for b, a in zip(slots_before, slots()))
  )
  later = {k: float(v) for k, v in train_steps(iterator, tf.constant(30)).items()}
  results[f"{kind}/overflow/scale_after_31"] = np.array(loss_scale(state.optimizer))
  results[f"{kind}/overflow/loss_after_31"] = np.array(later["loss"])
  results[f"{kind}/overflow/moved_after_31"] = np.array(
    max(np.abs(b - v.numpy()).max() for b, v in zip(trainable_before, state.model.trainable_variables))
  )
  if kind == "suncet":
    continue_checkpoint(config, one, state, train_steps, batch, checkpoint_dir, results)


def two_replica_checkpoint(check, results, checkpoint_dir):
  """A 2-replica mixed_float16 run: 2 steps, checkpoint, 1 more step.

  SuNCEt (fine-tuning) rather than PAWS only because it traces faster: a checkpoint holds the same objects
  (encoder, LARS slots, loss scale, step) for both. The step is the plain one: the one CPUs can run with
  several replicas.
  """
  config = tiny_config("mixed_float16", check)
  tf_keras.mixed_precision.set_global_policy("float32")
  weights = initial_weights(config, seed=WEIGHTS_SEED + 1)  # not the XLA state's: the restore must show
  mirrored = two_replicas()
  state = build_state(config, mirrored, weights)
  train_loop.restore(state, checkpoint_dir, keep=2)
  train_steps = make_steps("suncet", config, mirrored, state, jit_compile=False)
  iterator = replica_input.repeated(mirrored, suncet_batch(config))
  train_steps(iterator, tf.constant(2))
  state.step.assign(2)
  results["checkpoint/path"] = np.array(train_loop.save(state))
  results["checkpoint/scale"] = np.array(loss_scale(state.optimizer))
  record_weights(results, "checkpoint/weights", state.model)
  results["checkpoint/slots"] = np.concatenate(
    [v.numpy().ravel() for v in state.optimizer.variables() if "momentum" in v.name]
  )
  third = {k: float(v) for k, v in train_steps(iterator, tf.constant(1)).items()}
  for metric, value in third.items():
    results[f"checkpoint/two_replicas/step3/{metric}"] = np.array(value)


def continue_checkpoint(config, strategy, state, train_steps, batch, checkpoint_dir, results):
  """Restores the 2-replica checkpoint into the 1-replica XLA state and takes one step."""
  deadline = time.time() + 600
  while not os.path.exists(os.path.join(checkpoint_dir, READY)):
    if time.time() > deadline:
      raise TimeoutError(f"no checkpoint from the 'replicas' part in {checkpoint_dir}")
    time.sleep(0.5)
  restored = train_loop.restore(state, checkpoint_dir, keep=2)
  results["checkpoint/restored"] = np.array(restored or "")
  results["checkpoint/restored_step"] = np.array(int(state.step.numpy()))
  results["checkpoint/restored_scale"] = np.array(loss_scale(state.optimizer))
  results["checkpoint/restored_iterations"] = np.array(int(state.optimizer.iterations.numpy()))
  record_weights(results, "checkpoint/restored_weights", state.model)
  results["checkpoint/restored_slots"] = np.concatenate(
    [v.numpy().ravel() for v in state.optimizer.variables() if "momentum" in v.name]
  )
  before = [v.numpy() for v in state.model.trainable_variables]
  third = run_calls(train_steps, strategy, batch, [1])[0]
  for metric, value in third.items():
    results[f"checkpoint/one_replica_xla/step3/{metric}"] = np.array(value)
  results["checkpoint/moved"] = np.array(
    max(np.abs(b - v.numpy()).max() for b, v in zip(before, state.model.trainable_variables))
  )


def runtime_checks(results):
  """configure_cpu_replicas once TensorFlow runs, and setup_training's strategy and XLA choice."""
  devices.configure_cpu_replicas(2)  # the count in place: nothing to do
  try:
    devices.configure_cpu_replicas(3)
    results["runtime/reconfigure_error"] = np.array("")
  except UserError as error:
    results["runtime/reconfigure_error"] = np.array(str(error))
  import config as presets  # pylint: disable=g-import-not-at-top

  config = presets.get_config("digits")
  config.run.cpu_replicas, config.run.jit_compile, config.run.precision = 2, "true", "float32"
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    cli.use_console_logging(chief=True)  # as run_script does: the console on this stdout
    strategy, jit_compile = devices.setup_training(config)
  tf.get_logger().warning(TF_WARNING)  # TensorFlow's warnings (e.g. mixed precision on a CPU) print once
  results["runtime/strategy"] = np.array(type(strategy).__name__)
  results["runtime/devices"] = np.array(list(strategy.extended.worker_devices))
  results["runtime/jit_compile"] = np.array(jit_compile)
  results["runtime/printed"] = np.array(printed.getvalue())
  results["runtime/one_device_compiles"] = np.array(
    devices.replicas_compile_with_xla(tf.distribute.OneDeviceStrategy("/cpu:0"))
  )


READY = "written"  # marker file: the 2-replica checkpoint is complete
TF_WARNING = "probe: a TensorFlow warning"


def main(part, output, checkpoint_dir):
  """Runs one part and saves its results to `output`.

  The two parts run at the same time (XLA compiles on one core): 'replicas' (2 logical CPUs: all-gather,
  run.cpu_replicas, the 2-replica checkpoint, the GPU-route traces) and 'xla' (one replica, XLA against the
  plain step; it waits for the checkpoint before continuing it).
  """
  devices.configure_cpu_replicas(2)  # the API under test, before TensorFlow initialises
  from tests import distributed_train_check as check  # pylint: disable=g-import-not-at-top

  results, printed = {}, set()

  def write_checkpoint():
    two_replica_checkpoint(check, results, checkpoint_dir)
    open(os.path.join(checkpoint_dir, READY), "w").close()

  sections = {
    "replicas": [
      ("gather", lambda: gather_checks(results)),  # initialises TensorFlow's devices
      ("runtime", lambda: runtime_checks(results)),
      ("checkpoint", write_checkpoint),
      # Last: running a step on the GPU route aborts this process's collective executor.
      ("gpu_route", lambda: gpu_route_traces(check, results)),
    ],
    "xla": [
      ("paws_float32", lambda: xla_float32("paws", check, results)),
      ("suncet_float32", lambda: xla_float32("suncet", check, results)),
      ("paws_float16", lambda: xla_float16("paws", check, results, checkpoint_dir)),
      ("suncet_float16", lambda: xla_float16("suncet", check, results, checkpoint_dir)),
    ],
  }[part]
  for name, section in sections:
    start = time.perf_counter()
    section()
    results[f"seconds/section/{name}"] = np.array(time.perf_counter() - start)
    print(
      f"{name}: {time.perf_counter() - start:.1f} s "
      + ", ".join(
        f"{k[len('seconds/') :]} {float(v):.1f}"
        for k, v in results.items()
        if k.startswith("seconds/") and "/section/" not in k and k not in printed
      ),
      flush=True,
    )
    printed.update(results)
  np.savez(output, **results)


# --- The tests -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  folder = tmp_path_factory.mktemp("xla_replicas")
  environment = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
  environment.pop("TF_CONFIG", None)
  parts = {
    part: subprocess.Popen(
      [sys.executable, "-m", "tests.test_xla_replicas", part, str(folder / f"{part}.npz"), str(folder)],
      cwd=ROOT,
      env=environment,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for part in ("replicas", "xla")
  }
  merged = {}
  try:
    for part, process in parts.items():
      _, stderr = process.communicate(timeout=900)
      assert process.returncode == 0, f"{part}: {stderr[-3000:]}"
      merged[f"stderr/{part}"] = stderr
      with np.load(folder / f"{part}.npz") as data:
        merged.update(data)
  finally:
    for process in parts.values():
      if process.poll() is None:
        process.kill()
        process.communicate()
  return merged


def weights_of(results, prefix):
  return [results[key] for key in sorted(k for k in results if k.startswith(prefix + "/"))]


def assert_metrics_close(actual, expected, metrics, message):
  for metric in metrics:
    # loss = ce + me_max nearly cancel: its tolerance is relative to the size of the terms.
    scale = (
      abs(expected["ce"]) + abs(expected["me_max"]) if metric == "loss" and "ce" in expected else abs(expected[metric])
    )
    np.testing.assert_allclose(
      actual[metric], expected[metric], rtol=0, atol=1e-5 * scale, err_msg=f"{metric} {message}"
    )


def assert_weights_close(actual, expected, initial, message, factor=1):
  """Values within rtol/atol 1e-5 and updates (after - initial) within rtol 1e-4 (tests/test_distributed.py).

  factor widens every tolerance (after several steps).
  """
  assert len(actual) == len(expected) == len(initial) > 0
  for index, (a, e, i) in enumerate(zip(actual, expected, initial)):
    np.testing.assert_allclose(a, e, rtol=1e-5 * factor, atol=1e-5 * factor, err_msg=f"variable {index} {message}")
    update = e - i
    np.testing.assert_allclose(
      a - i,
      update,
      rtol=1e-4 * factor,
      atol=(1e-4 * np.abs(update).max() + 1e-6) * factor,
      err_msg=f"update of variable {index} {message}",
    )


def metrics_of(results, prefix, kind):
  return {metric: float(results[f"{prefix}/{metric}"]) for metric in METRICS[kind]}


def test_cpu_replicas_split_the_cpu_and_mirror_over_it(results):
  assert str(results["runtime/strategy"]) == "MirroredStrategy"
  assert [d.split("/")[-1] for d in results["runtime/devices"]] == ["device:CPU:0", "device:CPU:1"]
  printed = str(results["runtime/printed"])
  assert "cpu_replicas: MirroredStrategy over 2 logical CPU devices" in printed
  # run.jit_compile=true with 2 CPU replicas: XLA cannot compile their collectives, so it is turned off.
  assert not results["runtime/jit_compile"] and "xla: off" in printed
  assert results["runtime/one_device_compiles"]
  assert "already initialised" in str(results["runtime/reconfigure_error"])
  assert results["stderr/replicas"].count(TF_WARNING) == 1  # once, not again through absl's handler


def test_cpu_replicas_errors():
  devices.configure_cpu_replicas(0)  # off: nothing to do
  with pytest.raises(UserError, match="splits nothing"):
    devices.configure_cpu_replicas(1)
  for setting in ("one_device", "multi_worker"):
    with pytest.raises(UserError, match=f"needs run.distribution=auto or mirrored, got {setting}"):
      devices.make_strategy(setting, cpu_replicas=2)


def test_cpu_replicas_error_through_the_command_line(tmp_path):
  from tests import scriptrun  # pylint: disable=g-import-not-at-top

  result = scriptrun.run(
    "paws_train.py",
    "--config=config.py:digits",
    "--config.run.cpu_replicas=2",
    "--config.run.distribution=one_device",
    f"--workdir={tmp_path}/work",
  )
  assert result.returncode == 2, result.stderr[-2000:]
  assert "run.cpu_replicas=2 rehearses a one-machine multi-GPU run" in scriptrun.error_line(result)
  assert not os.path.exists(tmp_path / "work")


def test_tensorflow_all_gather_cannot_run_in_the_per_gpu_xla_step(results):
  assert "merge_call" in str(results["gather/tensorflow/gpu_route"])
  assert str(results["gather/steps/gpu_route"]) == "traced"


def test_all_gather_equals_tensorflow_all_gather(results):
  # Replica r holds range(6).reshape(3, 2) * (r + 1.5) and maximises (r + 1) * sum(gathered * weights).
  rows = np.arange(6, dtype=np.float32).reshape(3, 2)
  expected = np.concatenate([rows * 1.5, rows * 2.5])
  weights = results["gather/weights"]
  for replica in (0, 1):
    for name in ("tf", "steps"):
      np.testing.assert_array_equal(results[f"gather/values/{name}/{replica}"], expected)
      # d/dx_r of sum over replicas r' of (r' + 1) * sum(gathered * weights) = (1 + 2) * weights[rows of r]
      np.testing.assert_allclose(
        results[f"gather/values/{name}_grad/{replica}"], 3 * weights[3 * replica : 3 * replica + 3], rtol=1e-6
      )
    np.testing.assert_array_equal(
      results[f"gather/values/steps_grad/{replica}"], results[f"gather/values/tf_grad/{replica}"]
    )


@pytest.mark.parametrize("kind", ["paws", "suncet"])
@pytest.mark.parametrize("precision", PRECISIONS)
def test_steps_trace_as_one_xla_program_per_gpu(results, kind, precision):
  key = f"gpu_route/{kind}/{precision}"
  assert int(results[f"{key}/xla_functions"]) == 2  # one per replica, as on 2 GPUs
  # Synchronized BatchNorm (PAWS), the support all-gather and the gradient sum are collectives inside each.
  assert all(count > 0 for count in results[f"{key}/collectives_per_xla_function"])
  assert int(results[f"{key}/collective_gathers"]) == 0


def test_gpu_route_step_stops_only_at_the_cpu_collectives(results):
  # On CPU devices XLA refuses the collectives: with TensorFlow's ring implementation for CPUs
  # ("Only compiling NCCL/auto collective is supported, got: ring") and, with NCCL/auto,
  # "Collectives are not yet implemented for CPU devices when compiling with XLA". Nothing ran.
  error = str(results["gpu_route/run_error"])
  assert "ollective" in error and ("NCCL/auto" in error or "not yet implemented for CPU" in error), error
  assert results["gpu_route/unchanged"]


@pytest.mark.parametrize("kind", ["paws", "suncet"])
def test_inputs_keep_clear_of_relu_kinks(results, kind):
  # Precondition of the float32 comparisons (see MIN_RELU_MARGIN). If it fails (other TensorFlow numerics,
  # other initialisation), pick other seeds; the comparisons would say nothing.
  assert results[f"{kind}/float32/relu_margin"].min() >= MIN_RELU_MARGIN, results[f"{kind}/float32/relu_margin"]


@pytest.mark.parametrize("kind", ["paws", "suncet"])
def test_xla_step_equals_the_plain_step_in_float32(results, kind):
  plain = metrics_of(results, f"{kind}/float32/plain/step1", kind)
  assert_metrics_close(metrics_of(results, f"{kind}/float32/xla/step1", kind), plain, METRICS[kind], "after step 1")
  initial = weights_of(results, f"{kind}/initial")
  assert_weights_close(
    weights_of(results, f"{kind}/float32/xla/step1/weights"),
    weights_of(results, f"{kind}/float32/plain/step1/weights"),
    initial,
    "after step 1",
  )
  # Steps 2 and 3 in one compiled call against one call per step.
  assert_weights_close(
    weights_of(results, f"{kind}/float32/xla/step3/weights"),
    weights_of(results, f"{kind}/float32/plain/step3/weights"),
    initial,
    "after step 3",
    factor=3,
  )
  assert int(results[f"{kind}/float32/xla/iterations"]) == int(results[f"{kind}/float32/plain/iterations"]) == 3


@pytest.mark.parametrize("kind", ["paws", "suncet"])
def test_xla_step_under_mixed_float16_is_within_the_precision_tolerance(results, kind):
  xla = metrics_of(results, f"{kind}/mixed_float16/xla/step1", kind)
  for reference in ("mixed_float16/plain", "float32/plain"):  # tolerances of tests/test_steps.py
    expected = metrics_of(results, f"{kind}/{reference}/step1", kind)
    for metric in METRICS[kind]:
      assert xla[metric] == pytest.approx(expected[metric], rel=0.05, abs=0.02), (metric, reference)


@pytest.mark.parametrize("kind", ["paws", "suncet"])
def test_loss_scale_overflow_inside_the_xla_step_skips_the_update_and_halves_the_scale(results, kind):
  assert float(results[f"{kind}/overflow/scale_after"]) == OVERFLOW_SCALE / 2
  assert results[f"{kind}/overflow/trainable_unchanged"] and results[f"{kind}/overflow/slots_unchanged"]
  # tf_keras counts a skipped step as an optimizer iteration (so the learning-rate schedule moves on).
  assert int(results[f"{kind}/overflow/iterations_after"]) == 1
  # 30 more steps in one call: the scale comes down until the gradients fit float16, then it trains.
  assert 1 <= float(results[f"{kind}/overflow/scale_after_31"]) < OVERFLOW_SCALE / 2**10
  assert np.isfinite(float(results[f"{kind}/overflow/loss_after_31"]))
  assert float(results[f"{kind}/overflow/moved_after_31"]) > 0


def test_checkpoint_of_two_replicas_continues_on_one_replica_with_xla(results):
  assert str(results["checkpoint/restored"]) == str(results["checkpoint/path"])
  assert int(results["checkpoint/restored_step"]) == 2 and int(results["checkpoint/restored_iterations"]) == 2
  assert float(results["checkpoint/restored_scale"]) == float(results["checkpoint/scale"])
  saved, restored = weights_of(results, "checkpoint/weights"), weights_of(results, "checkpoint/restored_weights")
  assert len(saved) == len(restored) > 0
  for a, b in zip(restored, saved):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(results["checkpoint/restored_slots"], results["checkpoint/slots"])
  # Step 3 from the same state: one replica with XLA against the two replicas, within the float16 tolerance.
  assert float(results["checkpoint/one_replica_xla/step3/loss"]) == pytest.approx(
    float(results["checkpoint/two_replicas/step3/loss"]), rel=0.05, abs=0.02
  )
  assert float(results["checkpoint/moved"]) > 0


def test_digits_rehearsal_through_the_three_scripts(tmp_path):
  """The rehearsal command of docs/running.md (digits preset, 2 CPU replicas, jit_compile=true), shrunk, float32.

  3 support images per class cannot be split per class between 2 replicas: each takes 15 of the 30 rows of
  the support batch (and of fine-tuning's batch). mixed_float16 is emulated on CPUs (minutes per step at
  the preset's size); its 2-replica steps are checked above.
  """
  from tests import scriptrun  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / "rehearsal")
  flags = [
    "--config=config.py:digits",
    "--config.run.cpu_replicas=2",
    "--config.run.jit_compile=true",
    "--config.run.precision=float32",
    "--config.data.labeled_per_class=4",
    "--config.pretrain.images_per_class=3",
    "--config.finetune.images_per_class=3",
    "--config.model.hidden_dim=32",
    "--config.model.projection_dim=32",
    "--config.pretrain.batch_size=448",
    "--config.pretrain.multicrop=2",
    "--config.pretrain.epochs=1",
    "--config.pretrain.warmup_epochs=0",
    "--config.finetune.epochs=2",
    "--config.run.log_every=1",
    f"--workdir={workdir}",
  ]
  outputs = {}
  for script in ("paws_train.py", "fine_tune.py", "nn_eval.py"):
    result = scriptrun.run(script, *flags, timeout=900)
    assert result.returncode == 0, f"{script}: {result.stderr[-3000:]}"
    outputs[script] = result.stdout
  for script in ("paws_train.py", "fine_tune.py"):
    assert "cpu_replicas: MirroredStrategy over 2 logical CPU devices" in outputs[script]
    assert "xla: off: XLA cannot compile the collectives of 2 replicas" in outputs[script]
  with open(os.path.join(workdir, "pretrain_log.jsonl")) as file:
    log = [json.loads(line) for line in file]
  steps_logged = [entry for entry in log if entry["kind"] == "step"]
  assert [entry["step"] for entry in steps_logged] == [1, 2, 3]  # 1347 // 448 steps
  assert all(np.isfinite(entry["loss"]) for entry in steps_logged)
  with open(os.path.join(workdir, "eval.json")) as file:
    metrics = json.load(file)
  assert metrics["num_support"] == 40 and metrics["num_test"] == 450
  assert 20 < metrics["top1"] <= 100, metrics  # chance is 10 %


if __name__ == "__main__":
  main(*sys.argv[1:])
