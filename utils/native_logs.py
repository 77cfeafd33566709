"""TensorFlow's C++ log level, chosen before TensorFlow loads (the entry scripts and benchmarks call it first).

Imports nothing that loads TensorFlow: TF_CPP_MIN_LOG_LEVEL is read when TensorFlow's native code starts.
"""

import os

# What TensorFlow's native code prints on a CPU-only machine is noise to a user: "failed call to cuInit"
# (no NVIDIA driver), absl's "WARNING: All log messages before absl::InitializeLog() ..." and XLA's
# "Compiled cluster using XLA!". Real failures still reach the user as Python exceptions, and TensorFlow's
# Python warnings (tf.get_logger) are not affected.
ERRORS_ONLY = "2"
SILENT = "3"


def has_usable_gpu() -> bool:
  """Whether this process may see an NVIDIA GPU: a driver is loaded and CUDA_VISIBLE_DEVICES does not hide it."""
  if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
    return False
  return os.path.exists("/proc/driver/nvidia/version")


def set_native_log_level() -> str:
  """Sets TF_CPP_MIN_LOG_LEVEL unless the user did: errors only with a GPU (its driver and library errors
  matter there), silent without one. Returns the level in force."""
  return os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", ERRORS_ONLY if has_usable_gpu() else SILENT)
