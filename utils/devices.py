"""Devices: tf.distribute strategy, precision policy, XLA choice, logical CPU replicas, cluster roles, machine;
in a cluster, lost workers and workers that restored different checkpoints."""

from collections.abc import Callable, Iterator
import contextlib
import json
import os
import platform
import re

from absl import logging
from ml_collections import ConfigDict
import tensorflow as tf
import tf_keras

from utils import config_rules
from utils.errors import UserError


def cluster_task() -> tuple[str, int] | None:
  """(task type, index) of this process in TF_CONFIG's cluster, or None when there is no TF_CONFIG."""
  setting = os.environ.get("TF_CONFIG")
  if not setting:
    return None
  task = json.loads(setting).get("task", {})
  return task.get("type", "worker"), int(task.get("index", 0))


def is_chief() -> bool:
  """Whether this process writes the job's logs, plots and config, and prints: always on one machine; in a
  TF_CONFIG cluster the 'chief' task, or worker 0 when there is none (MultiWorkerMirroredStrategy's rule)."""
  task = cluster_task()
  if task is None:
    return True
  has_chief = "chief" in json.loads(os.environ["TF_CONFIG"]).get("cluster", {})
  return task == ("chief", 0) if has_chief else task == ("worker", 0)


def has_gpu() -> bool:
  return bool(tf.config.list_physical_devices("GPU"))


def use_xla(setting: str | bool) -> bool:
  """'auto' means XLA on GPU only: on this project's CPU runs it made the step slower (docs/results.md)."""
  if setting == "auto":
    return has_gpu()
  if isinstance(setting, bool):
    return setting
  if setting in ("true", "false"):
    return setting == "true"
  config_rules.check_choice("run.jit_compile", setting)


def configure_cpu_replicas(count: int) -> None:
  """Splits the physical CPU into `count` logical devices (run.cpu_replicas), so a laptop runs the multi-replica path.

  Must run before TensorFlow initialises its devices (anything that places a tensor does). 0 leaves the
  CPU as it is; 1 is refused (one device is what the CPU already is, and one replica never runs the
  multi-replica code). Calling it again with the count already in place does nothing.
  """
  if count == 0:
    return
  if count < 0 or count == 1:
    raise UserError(f"run.cpu_replicas={count} splits nothing: use 0 (off) or 2 or more logical CPU devices")
  cpu = tf.config.list_physical_devices("CPU")[0]
  current = tf.config.get_logical_device_configuration(cpu)
  if current is not None and len(current) == count:
    return
  try:
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
  except RuntimeError:
    raise UserError(
      f"run.cpu_replicas={count}: TensorFlow's devices are already initialised in this "
      "process; set it before anything runs TensorFlow (a fresh process, e.g. restart the "
      "notebook kernel)"
    ) from None


def replicas_compile_with_xla(strategy: tf.distribute.Strategy) -> bool:
  """Whether XLA can compile this strategy's per-replica step, collectives included (docs/running.md).

  One replica has no collectives. Several replicas compile only on whole GPUs: there MirroredStrategy runs
  one XLA program per replica with NCCL collectives. On CPU devices (run.cpu_replicas, CPU workers) XLA
  refuses collectives ("Collectives are not yet implemented for CPU devices when compiling with XLA"), and
  GPUs split into logical devices use ring collectives, which XLA refuses too ("Only compiling NCCL/auto
  collective is supported").
  """
  if strategy.num_replicas_in_sync == 1:
    return True
  whole_gpus = len(tf.config.list_logical_devices("GPU")) == len(tf.config.list_physical_devices("GPU"))
  return whole_gpus and all(tf.DeviceSpec.from_string(d).device_type == "GPU" for d in strategy.extended.worker_devices)


def make_strategy(setting: str, cpu_replicas: int = 0, collective_timeout: float = 10) -> tf.distribute.Strategy:
  """Single device by default, MirroredStrategy with several GPUs, multi-worker from TF_CONFIG.

  With cpu_replicas (configure_cpu_replicas done), MirroredStrategy over the logical CPU devices: the
  one-machine multi-GPU path, rehearsed on a CPU. collective_timeout (run.collective_timeout): in a cluster,
  the seconds after which a worker that stopped answering counts as lost (watch_peers).
  """
  if cpu_replicas:
    if setting == "auto" and not os.environ.get("TF_CONFIG"):
      setting = "mirrored"
    if setting != "mirrored":
      shown = "multi_worker (TF_CONFIG is set)" if setting == "auto" else setting
      raise UserError(
        f"run.cpu_replicas={cpu_replicas} rehearses a one-machine multi-GPU run and needs "
        f"run.distribution=auto or mirrored, got {shown}; set run.cpu_replicas=0 or change it"
      )
    return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
  if setting == "auto":
    if os.environ.get("TF_CONFIG"):
      setting = "multi_worker"
    elif len(tf.config.list_logical_devices("GPU")) > 1:
      setting = "mirrored"
    else:
      setting = "one_device"
  if setting == "one_device":
    device = "/gpu:0" if has_gpu() else "/cpu:0"
    return tf.distribute.OneDeviceStrategy(device)
  if setting == "mirrored":
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([d.name for d in devices])
  if setting == "multi_worker":
    watch_peers(collective_timeout)
    return tf.distribute.MultiWorkerMirroredStrategy()
  config_rules.check_choice("run.distribution", setting)


def watch_peers(timeout: float) -> None:
  """Makes every worker's collectives fail `timeout` seconds after a peer stops answering (run.collective_timeout).

  MultiWorkerMirroredStrategy starts TensorFlow's coordination service (on the chief, else worker 0): each
  worker sends it heartbeats; when one stops (killed, VM preempted, host unreachable) for the heartbeat
  timeout, the service aborts every worker's collectives with an error naming it, and a worker that
  cannot reach the service aborts its own. Measured with two workers on one machine and TensorFlow's
  10 s: a survivor stopped 0.2 to 8.5 s after SIGKILL or SIGSTOP of the other (docs/running.md). The
  per-collective timeout, CommunicationOptions(timeout_seconds), was not used: TensorFlow starts a thread
  per collective that sleeps for the timeout, and a 60 s timeout grew a tiny digits run to 6 500 threads
  in 40 s (a real run, with more steps per second, exhausts the process's threads).

  The strategy configures the service itself, with the default timeout, unless one is configured
  already; TensorFlow has no public setting for the timeout, so this configures it first with the same
  jobs and leader as the strategy would, through the eager context's configure_coordination_service:
  the project's one use of TensorFlow's private distribution internals. Call it right before creating
  the strategy, and only in a TF_CONFIG cluster.
  """
  from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2  # private: see above
  from tensorflow.python.eager import context  # private: see above

  if context.context().coordination_service is not None:
    return  # configured already (a second strategy in this process): TensorFlow keeps the first one
  cluster = tf.distribute.cluster_resolver.TFConfigClusterResolver().cluster_spec()
  jobs = [job for job in ("chief", "worker") if job in cluster.jobs]
  leader = "chief" if "chief" in jobs else "worker"
  context.context().configure_coordination_service(
    service_type="standalone",
    service_leader=f"/job:{leader}/replica:0/task:0",
    heartbeat_timeout_in_ms=int(timeout * 1000),
    coordinated_jobs=[
      coordination_config_pb2.CoordinatedJob(name=job, num_tasks=cluster.num_tasks(job)) for job in jobs
    ],
  )


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
  """Whether the strategy's replicas span several processes (a TF_CONFIG cluster)."""
  return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and cluster_task() is not None


def align_workers(strategy: tf.distribute.Strategy, step: tf.Variable, variables: list[tf.Variable]) -> bool:
  """In a cluster, every worker continues from the newest checkpoint any worker restored. Returns whether this
  worker took another's.

  Every worker restores the newest intact checkpoint of its own folder. These differ after a worker was
  killed between a step and the end of its save (the others finished theirs: saving needs no collective),
  or when one worker's newest checkpoint was unreadable: a worker would then resume at another step than
  the rest, with other weights. So the workers tell each other their steps and, unless all agree, every
  worker takes `variables` (all a checkpoint holds, `step` among them) from the first replica that holds
  the newest, by an all-reduce in which only that replica contributes (exact: x + 0 = x). Elsewhere nothing.
  """
  if not is_multi_worker(strategy):
    return False

  def gather_steps():
    replica = tf.distribute.get_replica_context()
    mine = tf.one_hot(replica.replica_id_in_sync_group, replica.num_replicas_in_sync, dtype=tf.float64)
    return replica.all_reduce(tf.distribute.ReduceOp.SUM, mine * tf.cast(step, tf.float64))

  steps = strategy.experimental_local_results(strategy.run(gather_steps))[0].numpy()
  own, newest = int(step.numpy()), int(steps.max())
  if steps.min() == newest:
    return False
  source = int(steps.argmax())

  def take_from_source():
    replica = tf.distribute.get_replica_context()
    keep = tf.equal(replica.replica_id_in_sync_group, source)
    values = [tf.cast(v, tf.float64) for v in variables]
    values = [tf.where(keep, value, tf.zeros_like(value)) for value in values]
    return replica.all_reduce(tf.distribute.ReduceOp.SUM, values)

  results = strategy.experimental_local_results(strategy.run(take_from_source))[0]
  for variable, value in zip(variables, results, strict=True):
    variable.assign(tf.cast(value, variable.dtype))
  logging.info(
    f"workers restored checkpoints of different steps ({', '.join(str(int(s)) for s in steps)} by replica): every "
    f"worker continues from step {newest}, the newest"
  )
  return own != newest


class WorkerLost(UserError):
  """A peer of a TF_CONFIG cluster stopped answering: the run stopped (cli exits at once, see exit_now)."""

  exit_now = True  # TensorFlow's teardown at a normal exit would wait for the lost peer


# The task names in TensorFlow's errors, by how sure they are to name the lost worker.
_TASK = r"/job:(\w+)/replica:\d+/task:(\d+)"
_LOST_TASK_PATTERNS = (
  r"stopped sending heartbeats\)?:\s*" + _TASK,  # the coordination service names the silent task
  r"from remote target " + _TASK,  # a collective's call to that task failed (its connection closed)
)
# The errors of a lost peer: collectives aborted, heartbeats refused or timed out.
_PEER_ERROR_MARKERS = ("Collective ops is aborted", "CoordinationService", "stopped sending heartbeats")


def lost_worker_name(message: str) -> str | None:
  """'worker 1' if TensorFlow's error names the lost task, else None."""
  for pattern in _LOST_TASK_PATTERNS:
    match = re.search(pattern, message)
    if match:
      return f"{match.group(1)} {match.group(2)}"
  if "CoordinationService/Heartbeat" in message:  # this worker's heartbeats to the service's host went unanswered
    cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    return "chief 0" if "chief" in cluster else "worker 0"
  return None


@contextlib.contextmanager
def lost_workers(
  strategy: tf.distribute.Strategy, current_step: Callable[[], int], last_checkpoint: Callable[[], str | None]
) -> Iterator[None]:
  """In a cluster, TensorFlow's error for a lost peer becomes one WorkerLost line: the lost worker (if
  TensorFlow's error names it), the step, and this worker's last checkpoint, from which a restart of every
  worker resumes (align_workers: no worker holds a newer one)."""
  try:
    yield
  except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError) as error:
    message = str(error)
    if not is_multi_worker(strategy) or not any(marker in message for marker in _PEER_ERROR_MARKERS):
      raise
    name = lost_worker_name(message)
    checkpoint = last_checkpoint()
    restart = (
      f"the last checkpoint is {checkpoint}: restart every worker with the same command to resume from it"
      if checkpoint
      else "no checkpoint was written yet: restart every worker with the same command to start again"
    )
    raise WorkerLost(
      f"lost {name or 'a worker'} of the cluster (it stopped answering: killed, preempted or unreachable); "
      f"stopped at step {current_step()}, {restart}"
    ) from None


def cpu_has_amx() -> bool:
  """True if this CPU has AMX bfloat16 tile instructions (read from /proc/cpuinfo)."""
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
  except OSError:
    return False
  return "amx_bf16" in flags


def resolve_precision(setting: str) -> str:
  """'auto' picks the precision measured to be faster, not what the CPU flags merely allow.

  mixed_float16 on a GPU (tensor cores; the reference trains with fp16 autocast); mixed_bfloat16 on a
  CPU with AMX (2.1x faster than float32 on the train step, docs/results.md); float32 everywhere else
  (without AMX, bf16 is emulated and slower).
  """
  config_rules.check_choice("run.precision", setting)
  if setting != "auto":
    return setting
  if has_gpu():
    return "mixed_float16"
  return "mixed_bfloat16" if cpu_has_amx() else "float32"


def setup_training(config: ConfigDict) -> tuple[tf.distribute.Strategy, bool]:
  """Precision policy, seeded initialisation, device strategy and XLA choice for a training script.

  Resolves config.run.precision in place (so the saved config says what ran). XLA asked for (or 'auto'
  on a GPU) is turned off, with a printed reason, where it cannot compile the replicas' collectives
  (replicas_compile_with_xla).
  Returns (strategy, jit_compile).
  """
  runs = config.run
  configure_cpu_replicas(runs.cpu_replicas)  # first: before anything initialises TensorFlow's devices
  set_precision(config)
  # Python, NumPy and TensorFlow seeds: the initial weights follow config.seed.
  tf_keras.utils.set_random_seed(config.seed)
  strategy = make_strategy(runs.distribution, runs.cpu_replicas, runs.collective_timeout)
  jit_compile = use_xla(runs.jit_compile)
  if runs.cpu_replicas:
    logging.info(
      f"cpu_replicas: MirroredStrategy over {strategy.num_replicas_in_sync} logical CPU devices "
      "(rehearsal of a multi-GPU run)"
    )
  if jit_compile and not replicas_compile_with_xla(strategy):
    logging.info(
      f"xla: off: XLA cannot compile the collectives of {strategy.num_replicas_in_sync} replicas on "
      "these devices (whole GPUs only); the step runs as a plain tf.function"
    )
    jit_compile = False
  return strategy, jit_compile


def set_precision(config: ConfigDict) -> None:
  """Resolves config.run.precision ('auto') in place and sets the global tf_keras dtype policy.

  Losses are always computed in float32, and the projection/prediction heads
  stay float32 (utils/model/encoder.py).
  """
  config.run.precision = resolve_precision(config.run.precision)
  tf_keras.mixed_precision.set_global_policy(config.run.precision)
  logging.info(f"precision: {config.run.precision}")


def machine_description() -> str:
  """CPU model, core count, Python version and GPUs, for the header of a benchmark table."""
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  gpus = [device.name for device in tf.config.list_physical_devices("GPU")]
  return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}, " + (
    f"GPUs: {', '.join(gpus)}" if gpus else "no GPU"
  )
