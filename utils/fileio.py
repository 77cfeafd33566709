"""Ground floor: atomic writes and JSON on any tf.io.gfile path (local, gs://, ...), and the config as plain data."""

import io
import json

from ml_collections import ConfigDict
import numpy as np
import tensorflow as tf

from utils.errors import UserError


def config_to_dict(config: ConfigDict) -> dict:
  return json.loads(config.to_json())


def write_file(path: str, contents: str | bytes) -> None:
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


def write_json(path: str, value) -> None:
  """Writes JSON atomically (write_file), so a crash leaves the old file."""
  write_file(path, json.dumps(value, indent=2, sort_keys=True))


def write_npy(path: str, array: np.ndarray) -> None:
  """np.save to any tf.io.gfile path, atomically (write_file)."""
  buffer = io.BytesIO()
  np.save(buffer, array)
  write_file(path, buffer.getvalue())


def read_npy(path: str) -> np.ndarray:
  """np.load of a file on any tf.io.gfile file system (local, gs://, ...)."""
  with tf.io.gfile.GFile(path, "rb") as file:
    return np.load(io.BytesIO(file.read()))


def read_json(path: str, what: str):
  if not tf.io.gfile.exists(path):
    raise UserError(f"{path} not found: {what}")
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)
