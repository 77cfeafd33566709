"""Test-wide settings: quiet TensorFlow, CPU only. The repository root is importable through pyproject.toml's
pytest `pythonpath`."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
