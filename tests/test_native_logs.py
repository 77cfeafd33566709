"""utils/native_logs.py: the C++ log level a script starts with (the start-up noise test is in test_scripts.py)."""

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
