"""What the three entry scripts share around the model: errors, workdir, config, devices, precision."""
import functools
import json
import os
import sys

from absl import logging
import tensorflow as tf
import tf_keras

from utils.errors import UserError


def exit_on_user_error(main):
  """Turns a UserError into one line on stderr and exit status 2 (no traceback); see training.Interrupted."""

  @functools.wraps(main)
  def wrapped(argv):
    logging.set_verbosity(logging.WARNING)
    try:
      return main(argv)
    except UserError as error:
      print(f"error: {error}", file=sys.stderr)
      # 2 for a bad input; 128 + N for a run stopped by signal N after saving (training.Interrupted).
      sys.exit(getattr(error, "exit_code", 2))

  return wrapped


def prepare_workdir(workdir):
  """Creates the workdir and checks it is writable before any work starts."""
  if not workdir:
    raise UserError("--workdir is required: the folder where checkpoints, logs and results go")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as error:
    raise UserError(f"workdir {workdir} is not writable ({error.strerror}); "
                    "choose another --workdir or fix its permissions") from None
  return workdir


def config_to_dict(config):
  return json.loads(config.to_json())


def check_config(config, path, sections, force=False):
  """Saves the resolved config to `path`, or checks it against the saved one.

  Only the listed config sections are compared: they define what the run in
  this workdir computes, so resuming with other values would silently mix two
  experiments. `force` overwrites the saved config instead.
  """
  current = config_to_dict(config)
  if os.path.exists(path) and not force:
    with open(path) as f:
      saved = json.load(f)
    changed = [f"{section}.{key}" for section in sections
               for key in sorted(set(saved.get(section, {})) | set(current.get(section, {})))
               if saved.get(section, {}).get(key) != current.get(section, {}).get(key)]
    if changed:
      raise UserError(
          f"{path} was written with other settings ({', '.join(changed[:5])}); "
          "use a new --workdir, restore those values, or pass --force to overwrite")
  else:
    write_json(path, current)
  return current


def write_json(path, value):
  """Writes JSON atomically (temp file + rename), so a crash leaves the old file."""
  temporary = path + ".tmp"
  with open(temporary, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
  os.replace(temporary, path)


def read_json(path, what):
  if not os.path.exists(path):
    raise UserError(f"{path} not found: {what}")
  with open(path) as f:
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


def make_strategy(setting):
  """Single device by default, MirroredStrategy with several GPUs, multi-worker from TF_CONFIG."""
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

  Resolves config.run.precision in place (so the saved config says what ran).
  Returns (strategy, jit_compile).
  """
  set_precision(config)
  # Python, NumPy and TensorFlow seeds: the initial weights follow config.seed.
  tf_keras.utils.set_random_seed(config.seed)
  return make_strategy(config.run.distribution), use_xla(config.run.jit_compile)


def set_precision(config):
  """Resolves config.run.precision ('auto') in place and sets the global tf_keras dtype policy.

  Losses are always computed in float32, and the projection/prediction heads
  stay float32 (utils/encoder.py).
  """
  config.run.precision = resolve_precision(config.run.precision)
  tf_keras.mixed_precision.set_global_policy(config.run.precision)
  print(f"precision: {config.run.precision}")
