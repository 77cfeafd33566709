"""Test-wide settings: quiet TensorFlow, CPU only. The repository root is importable through pyproject.toml's
pytest `pythonpath`."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # as the scripts (utils/native_logs.use_tf_keras)
