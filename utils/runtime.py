"""What the three entry scripts share around the model: errors, workdir, config, devices, precision."""

import atexit
import fcntl
import functools
import json
import logging as std_logging
import os
import re
import socket
import sys

from absl import app, flags, logging
from ml_collections import config_flags
import tensorflow as tf
import tf_keras

from utils import validation
from utils.errors import UserError


def exit_on_user_error(main):
  """Turns a UserError into one line on stderr and exit status 2 (no traceback); see training.Interrupted."""

  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except UserError as error:
      print(f"error: {error}", file=sys.stderr)
      # 2 for a bad input; 128 + N for a run stopped by signal N after saving (training.Interrupted).
      sys.exit(getattr(error, "exit_code", 2))

  return wrapped


def cluster_task():
  """(task type, index) of this process in TF_CONFIG's cluster, or None when there is no TF_CONFIG."""
  setting = os.environ.get("TF_CONFIG")
  if not setting:
    return None
  task = json.loads(setting).get("task", {})
  return task.get("type", "worker"), int(task.get("index", 0))


def is_chief():
  """Whether this process writes the job's logs, plots and config, and prints: always on one machine; in a
  TF_CONFIG cluster the 'chief' task, or worker 0 when there is none (MultiWorkerMirroredStrategy's rule)."""
  task = cluster_task()
  if task is None:
    return True
  has_chief = "chief" in json.loads(os.environ["TF_CONFIG"]).get("cluster", {})
  return task == ("chief", 0) if has_chief else task == ("worker", 0)


def worker_directory(directory):
  """Where this process keeps what every worker must write: `directory` on the chief, else
  `directory/workers/<type><index>`.

  With MultiWorkerMirroredStrategy every worker must save checkpoints and the encoder (reading the
  BatchNorm statistics is a collective); other workers keep theirs, and their copy of the labeled subset,
  there, so that each can resume and fine-tune on its own whether or not the workdir is shared (gs://).
  """
  if is_chief():
    return directory
  kind, index = cluster_task()
  return os.path.join(directory, "workers", f"{kind}{index}")


def prepare_workdir(workdir):
  """Creates the workdir, checks it is writable and locks it (lock_workdir) before any work starts.

  Any file system tf.io.gfile knows works (local, gs://, ...): every run output goes through it. In a
  cluster only the chief locks it (the other workers share it and write to their worker_directory).
  """
  if not workdir:
    raise UserError("--workdir is required: the folder where checkpoints, logs and results go")
  try:
    tf.io.gfile.makedirs(workdir)
    probe = os.path.join(workdir, ".write_test")
    with tf.io.gfile.GFile(probe, "w") as f:
      f.write("ok")
    tf.io.gfile.remove(probe)
  except (OSError, tf.errors.OpError) as error:
    raise UserError(
      f"workdir {workdir} is not writable ({_reason(error)}); choose another --workdir or fix its permissions"
    ) from None
  if is_chief():
    lock_workdir(workdir)
  return workdir


def _reason(error):
  """The short cause of a failed file operation: the OS's words, or the first line of TensorFlow's message."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  return str(getattr(error, "message", error)).strip().splitlines()[0][:200]


def config_to_dict(config):
  return json.loads(config.to_json())


def check_config(config, path, sections, force=False):
  """Saves the resolved config to `path`, or checks it against the saved one.

  Only the listed config sections are compared: they define what the run in
  this workdir computes, so resuming with other values would silently mix two
  experiments. `force` overwrites the saved config instead.
  """
  current = config_to_dict(config)
  if tf.io.gfile.exists(path) and not force:
    with tf.io.gfile.GFile(path) as f:
      saved = json.load(f)
    changed = [
      f"{section}.{key}"
      for section in sections
      for key in sorted(set(saved.get(section, {})) | set(current.get(section, {})))
      if saved.get(section, {}).get(key) != current.get(section, {}).get(key)
    ]
    if changed:
      raise UserError(
        f"{path} was written with other settings ({', '.join(changed[:5])}); "
        "use a new --workdir, restore those values, or pass --force to overwrite"
      )
  else:
    write_json(path, current)
  return current


def write_file(path, contents):
  """Writes bytes or text to any tf.io.gfile path (local, gs://, ...) atomically: temp file + rename.

  A crash leaves the old file whole; on object stores (gs://) the rename is a copy then a delete, so a
  reader never sees a half-written file either. A temp file left by a crash is removed first: TensorFlow's
  ram:// file system appends to an existing file even in "w" mode.
  """
  temporary = path + ".tmp"
  if tf.io.gfile.exists(temporary):
    tf.io.gfile.remove(temporary)
  with tf.io.gfile.GFile(temporary, "wb" if isinstance(contents, bytes) else "w") as f:
    f.write(contents)
  tf.io.gfile.rename(temporary, path, overwrite=True)


def write_json(path, value):
  """Writes JSON atomically (write_file), so a crash leaves the old file."""
  write_file(path, json.dumps(value, indent=2, sort_keys=True))


def read_json(path, what):
  if not tf.io.gfile.exists(path):
    raise UserError(f"{path} not found: {what}")
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def has_gpu():
  return bool(tf.config.list_physical_devices("GPU"))


def use_xla(setting):
  """'auto' means XLA on GPU only: on this project's CPU runs it made the step ~2x slower."""
  if setting == "auto":
    return has_gpu()
  if isinstance(setting, bool):
    return setting
  if setting in ("true", "false"):
    return setting == "true"
  raise UserError(f"run.jit_compile must be one of auto, true, false, got {setting!r}")


def configure_cpu_replicas(count):
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


def replicas_compile_with_xla(strategy):
  """Whether XLA can compile this strategy's per-replica step, collectives included (README, Before a long GPU run).

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


def make_strategy(setting, cpu_replicas=0):
  """Single device by default, MirroredStrategy with several GPUs, multi-worker from TF_CONFIG.

  With cpu_replicas (configure_cpu_replicas done), MirroredStrategy over the logical CPU devices: the
  one-machine multi-GPU path, rehearsed on a CPU.
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
    return tf.distribute.MultiWorkerMirroredStrategy()
  raise UserError(f"run.distribution must be one of auto, one_device, mirrored, multi_worker, got {setting!r}")


PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")


def cpu_has_amx():
  """True if this CPU has AMX bfloat16 tile instructions (read from /proc/cpuinfo)."""
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
  except OSError:
    return False
  return "amx_bf16" in flags


def resolve_precision(setting):
  """'auto' picks the precision measured to be faster, not what the CPU flags merely allow.

  mixed_float16 on a GPU (tensor cores; the reference trains with fp16 autocast); mixed_bfloat16 on a
  CPU with AMX (2.1x faster than float32 on the train step); float32 everywhere else: with AVX512-BF16
  alone, bf16 measured 1.55x slower than float32 (README, Speed).
  """
  if setting not in PRECISIONS:
    raise UserError(f"run.precision must be one of {', '.join(PRECISIONS)}, got {setting!r}")
  if setting != "auto":
    return setting
  if has_gpu():
    return "mixed_float16"
  return "mixed_bfloat16" if cpu_has_amx() else "float32"


def setup_training(config):
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
  strategy = make_strategy(runs.distribution, runs.cpu_replicas)
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


def set_precision(config):
  """Resolves config.run.precision ('auto') in place and sets the global tf_keras dtype policy.

  Losses are always computed in float32, and the projection/prediction heads
  stay float32 (utils/encoder.py).
  """
  config.run.precision = resolve_precision(config.run.precision)
  tf_keras.mixed_precision.set_global_policy(config.run.precision)
  logging.info(f"precision: {config.run.precision}")


# --- Entry point, config flag and workdir lock ----------------------------------------------------


def define_config_flag(default="config.py:digits", flag_values=flags.FLAGS, argv=None):
  """Defines --config: a preset of config.py plus --config.FIELD=VALUE overrides. Returns the flag holder.

  Without --config on the command line, ml_collections parses the default and its overrides while the
  flag is defined, i.e. when the script is imported, where a bad override is a traceback nothing can
  catch. Naming the default on the command line (in argv, right after the program name) makes absl parse
  it with the other flags, in run_script's parser. Command lines with a --flagfile are left as they are.

  Args:
    default: "FILE:PRESET" used when the command line names none.
    flag_values, argv: absl's registry and the command line (sys.argv, edited in place); for tests.
  """
  command_line = sys.argv if argv is None else argv
  if not any(re.match(r"^--?(config|flagfile)(=|$)", arg) for arg in command_line[1:]):
    command_line.insert(1, f"--config={default}")
  return config_flags.DEFINE_config_file(
    "config",
    default,
    "Preset and overrides.",
    flag_values=flag_values,
    lock_config=True,
    sys_argv=None if argv is None else argv,
  )


_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def use_console_logging(chief):
  """absl logging is the scripts' console: this project's records as plain lines on the current stdout, at
  INFO on the chief and WARNING elsewhere (so printed once per job); other libraries' absl records keep absl's
  own handler and format, warnings and errors only (Model Garden's INFO chatter stays out)."""
  absl_logger = logging.get_absl_logger()
  for handler in [h for h in absl_logger.handlers if isinstance(h, _ConsoleHandler)]:
    absl_logger.removeHandler(handler)
  absl_logger.addHandler(_ConsoleHandler())
  root_handler = logging.get_absl_handler()
  if not any(isinstance(f, _OtherLibraries) for f in root_handler.filters):
    root_handler.addFilter(_OtherLibraries())  # this project's records are printed once, by _ConsoleHandler
  logging.set_verbosity(logging.INFO if chief else logging.WARNING)
  tf_logger = tf.get_logger()
  tf_logger.setLevel(std_logging.WARNING)  # TensorFlow's own INFO lines (strategy set-up) stay out
  tf_logger.propagate = False  # it has its own stderr handler; through absl's, each warning printed twice


def _from_this_project(record):
  # A virtual environment inside the checkout (.venv) holds other libraries: their paths have site-packages.
  return record.pathname.startswith(_PROJECT_ROOT) and "site-packages" not in record.pathname


class _ConsoleHandler(std_logging.StreamHandler):
  def __init__(self):
    super().__init__(sys.stdout)
    self.setFormatter(std_logging.Formatter("%(message)s"))
    self.addFilter(_from_this_project)


class _OtherLibraries(std_logging.Filter):
  def filter(self, record):
    return not _from_this_project(record) and record.levelno >= std_logging.WARNING


def run_script(main, workdir_flag="workdir"):
  """Runs an entry script's main(argv) under absl, as `app.run(exit_on_user_error(main))` did, and more.

  A bad command line (unknown preset, unknown config field, wrong type, unknown flag) is one `error:` line
  and exit 2 (validation.parse_flags); then, before main, the config is checked field by field
  (validation.validate_config) and the --workdir, if it exists, is locked for this process (lock_workdir;
  prepare_workdir locks one it creates; one on gs:// or another non-local file system runs unlocked).
  --help still prints the usage.
  """

  @functools.wraps(main)
  def checked_main(argv):
    validation.validate_config(flags.FLAGS["config"].value)
    workdir = flags.FLAGS[workdir_flag].value if workdir_flag in flags.FLAGS else None
    chief = is_chief()
    if not chief:  # one job, one console output: the chief's (errors still reach stderr)
      sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of the process)
    elif workdir and _is_directory(workdir):
      lock_workdir(workdir)
    use_console_logging(chief)
    return main(argv)

  app.run(exit_on_user_error(checked_main), flags_parser=_parse_flags_or_exit)


def _is_directory(path):
  """tf.io.gfile.isdir, False where the file system cannot answer (no access to a bucket, say)."""
  try:
    return tf.io.gfile.isdir(path)
  except tf.errors.OpError:  # prepare_workdir then names the reason, or the script says the workdir is missing
    return False


def _parse_flags_or_exit(argv):
  try:
    return validation.parse_flags(argv)
  except UserError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


LOCK_FILE = ".lock"
_LOCKS = {}  # real path of each workdir this process holds -> its open lock file (None: not lockable, warned)


def lock_workdir(workdir):
  """Locks `workdir` for the rest of this process, or raises UserError naming the process that holds it.

  An exclusive fcntl.flock on WORKDIR/.lock: the kernel releases it when the holder exits, also when it
  is killed, so a lock left by a killed run never blocks the next one. The file holds the holder's pid,
  host and command for the message; a normal exit removes it. A folder inside a workdir this process
  already holds is covered by that lock (fine_tune.py writes WORKDIR/finetuned).

  flock needs a local file system: a workdir on another one (gs://, any tf.io.gfile scheme but file://)
  runs unlocked, with a one-line warning.

  Returns:
    The open lock file; the lock lasts as long as it stays open (this module keeps a reference).
    None for an unlocked workdir.
  """
  local = _local_path(workdir)
  path = os.path.realpath(local) if local is not None else workdir.rstrip("/")
  for locked, handle in _LOCKS.items():
    if path == locked or path.startswith(locked + os.sep):
      return handle
  if local is None:
    print(
      f"warning: workdir {workdir} is not on a local file system and cannot be locked; make sure no other run uses it",
      file=sys.stderr,
    )
    _LOCKS[path] = None  # warned once; folders inside it (WORKDIR/finetuned) are covered
    return None
  lock_path = os.path.join(path, LOCK_FILE)
  while True:
    try:
      handle = open(lock_path, "a+")  # noqa: SIM115 (held open for the process lifetime: closing releases the lock)
    except OSError as error:
      raise UserError(
        f"workdir {workdir} is not writable ({error.strerror}); choose another --workdir or fix its permissions"
      ) from None
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = _describe_holder(handle.read())
      handle.close()
      raise UserError(
        f"workdir {workdir} is in use by {holder}; wait for it to end or stop it, or use another --workdir"
      ) from None
    except OSError as error:  # a file system without flock (some network mounts): run unlocked
      print(
        f"warning: cannot lock workdir {workdir} ({error.strerror}); make sure no other run uses it", file=sys.stderr
      )
      handle.close()
      return None
    # A holder that just exited may have removed the file after we opened it: hold the file at the path.
    if _same_file(handle, lock_path):
      break
    handle.close()
  handle.seek(0)
  handle.truncate()
  json.dump(
    {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:300],
    },
    handle,
  )
  handle.flush()
  _LOCKS[path] = handle
  atexit.register(_release_lock, lock_path, handle)
  return handle


def _local_path(path):
  """The local path behind `path` ("file://" stripped), or None for another file system (gs://, ram://, ...)."""
  scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", path)
  if scheme is None:
    return path
  return path[len(scheme.group(0)) :] if scheme.group(1).lower() == "file" else None


def _same_file(handle, path):
  try:
    return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
  except FileNotFoundError:
    return False


def _describe_holder(text):
  try:
    holder = json.loads(text)
    return f"process {holder['pid']} on {holder['host']} ({holder['command']})"
  except (ValueError, KeyError, TypeError):  # the holder has not written its details yet
    return "another process"


def _release_lock(lock_path, handle):
  """Removes the lock file while still holding it (a process that opened it meanwhile retries), then unlocks."""
  try:
    if _same_file(handle, lock_path):
      os.remove(lock_path)
  except OSError:
    pass  # left behind, it only holds a stale pid: the next run takes the lock all the same
  handle.close()
