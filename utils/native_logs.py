"""What a process sets before TensorFlow loads (the entry scripts call it first): TensorFlow's C++ log level
and which Keras `tf.keras` is.

Imports nothing that loads TensorFlow: TF_CPP_MIN_LOG_LEVEL and TF_USE_LEGACY_KERAS are read when it loads.
"""

import ctypes
import importlib.util
import os

# What TensorFlow's native code prints on a CPU-only machine is noise to a user: "failed call to cuInit"
# (no NVIDIA driver), absl's "WARNING: All log messages before absl::InitializeLog() ..." and XLA's
# "Compiled cluster using XLA!". Real failures still reach the user as Python exceptions, and TensorFlow's
# Python warnings (tf.get_logger) are not affected.
ERRORS_ONLY = "2"
SILENT = "3"
# abseil's absl::SetMinLogLevel(absl::LogSeverityAtLeast) in the abseil release TensorFlow 2.20 is built with.
_ABSL_SET_MIN_LOG_LEVEL = "_ZN4absl12lts_2025012714SetMinLogLevelENS0_18LogSeverityAtLeastE"


def has_usable_gpu() -> bool:
  """Whether this process may see an NVIDIA GPU: a driver is loaded and CUDA_VISIBLE_DEVICES does not hide it."""
  if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
    return False
  return os.path.exists("/proc/driver/nvidia/version")


def set_native_log_level() -> str:
  """Sets TF_CPP_MIN_LOG_LEVEL unless the user did (errors only with a GPU: its driver and library errors matter
  there; silent without one), and the same minimum for absl's C++ logging. Returns the level in force."""
  level = os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", ERRORS_ONLY if has_usable_gpu() else SILENT)
  set_absl_min_log_level(int(level) if level.isdigit() else 0)
  return level


def use_tf_keras() -> None:
  """Makes `tf.keras` tf_keras (Keras 2), in this process and the ones it starts, unless the user chose.

  The project builds tf_keras objects only (Model Garden is built on it). Otherwise `import tensorflow` also
  imports Keras 3, installed beside it, for `tf.keras`: a quarter of TensorFlow's import time at every start
  (2.0 of 7.7 s of CPU measured on an AMD EPYC core), and a second Keras whose objects must not be mixed in.
  """
  os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")


def set_absl_min_log_level(severity: int) -> bool:
  """Sets absl's C++ minimum log severity (0 info, 1 warning, 2 error, 3 fatal) in TensorFlow's native library.

  XLA logs through absl, which ignores TF_CPP_MIN_LOG_LEVEL, and TensorFlow never calls absl::InitializeLog,
  so every absl message (the XLA line above) goes to stderr behind absl's warning about it. TensorFlow exports
  no Python call for this: the library's exported absl function is called through ctypes. Best effort: with
  another TensorFlow build (no such library or symbol) nothing changes and False is returned. Loading the
  library here, before TensorFlow, is the same load TensorFlow then reuses; TF_CPP_MIN_LOG_LEVEL must already
  be set, as the library reads it when it loads.
  """
  spec = importlib.util.find_spec("tensorflow")
  if spec is None or spec.origin is None:
    return False
  try:
    library = ctypes.CDLL(os.path.join(os.path.dirname(spec.origin), "libtensorflow_framework.so.2"))
    set_min_log_level = getattr(library, _ABSL_SET_MIN_LOG_LEVEL)
  except (OSError, AttributeError):
    return False
  set_min_log_level.argtypes = [ctypes.c_int]
  set_min_log_level.restype = None
  set_min_log_level(max(0, min(severity, 3)))
  return True
