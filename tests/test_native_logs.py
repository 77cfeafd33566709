"""utils/native_logs.py: the C++ log level and the Keras a script starts with (the start-up noise test is in
test_scripts.py)."""

import os
import subprocess
import sys

import pytest

from utils import native_logs


@pytest.mark.parametrize("visible", ["", "-1"])
def test_without_a_usable_gpu_the_native_logs_are_silent(monkeypatch, visible):
  monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
  assert not native_logs.has_usable_gpu()
  assert native_logs.set_native_log_level() == native_logs.SILENT


def test_a_users_own_level_wins(monkeypatch):
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")  # the suite's own level (conftest), kept for this process
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
  assert native_logs.set_native_log_level() == "2"


def test_this_tensorflow_exports_absls_log_level_setter():
  """Fails when a TensorFlow upgrade moves abseil to another release: update _ABSL_SET_MIN_LOG_LEVEL then."""
  assert native_logs.set_absl_min_log_level(2)


_KERAS_PROBE = """
import sys
from utils import native_logs
native_logs.use_tf_keras()
import tensorflow as tf
import tf_keras
print(tf.keras.layers.Dense is tf_keras.layers.Dense, "keras" in sys.modules)
"""


def test_tf_keras_is_tf_keras_and_keras_3_never_loads():
  env = {key: value for key, value in os.environ.items() if key != "TF_USE_LEGACY_KERAS"}
  result = subprocess.run(
    [sys.executable, "-c", _KERAS_PROBE], env=env, capture_output=True, text=True, timeout=300, check=True
  )
  assert result.stdout.split() == ["True", "False"]


def test_a_users_own_keras_choice_wins(monkeypatch):
  monkeypatch.setenv("TF_USE_LEGACY_KERAS", "0")
  native_logs.use_tf_keras()
  assert os.environ["TF_USE_LEGACY_KERAS"] == "0"
