"""The labeled subset: drawn per class by the label seed, read from a split file, written as index files.

METHOD.md section 4.
"""

import io
import os

import numpy as np
import tensorflow as tf

from utils import fileio
from utils.data import datasets
from utils.errors import UserError


def select_labeled_indices(labels, per_class, seed):
  """Draws the labeled subset: per_class training indices of every class (METHOD.md section 4).

  Args:
    labels: int training labels [N].
    per_class: images to draw per class, without replacement.
    seed: seed of `np.random.default_rng`.
  Returns:
    Sorted int64 indices into the training set.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  chosen = []
  for label in np.unique(labels):
    class_indices = np.flatnonzero(labels == label)
    if len(class_indices) < per_class:
      raise UserError(
        f"class {label} has only {len(class_indices)} training images but "
        f"{per_class} labeled per class were requested; lower the per-class count"
      )
    chosen.append(rng.choice(class_indices, size=per_class, replace=False))
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def read_split_file(path, num_train, labels=None, expected_count=None):
  """Reads a labeled-subset file, one training index per line (METHOD.md section 4).

  The format of the reference's `spc.4000_split.<seed>.txt`.

  Args:
    path: the text file.
    num_train: training-set size; every index must lie in [0, num_train).
    labels: optional training labels; if given, every class must have the same count.
    expected_count: optional number of indices the file must hold.
  Returns:
    Sorted int64 indices.
  """
  if not datasets._is_file(path):
    raise UserError(f"split file {path} does not exist; check the path")
  indices, seen_at = [], {}
  with tf.io.gfile.GFile(path) as file:
    for line_number, line in enumerate(file, start=1):
      text = line.strip()
      if not text:
        continue
      try:
        index = int(text)
      except ValueError:
        raise UserError(
          f"{path} line {line_number}: {text!r} is not an integer; the file must hold one training index per line"
        ) from None
      if not 0 <= index < num_train:
        raise UserError(
          f"{path} line {line_number}: index {index} is outside [0, {num_train}); "
          f"use a split file made for this training set"
        )
      if index in seen_at:
        raise UserError(f"{path} line {line_number}: index {index} repeats line {seen_at[index]}; remove the duplicate")
      seen_at[index] = line_number
      indices.append(index)
  if expected_count is not None and len(indices) != expected_count:
    raise UserError(
      f"{path} holds {len(indices)} indices but {expected_count} are expected; use a split file of the configured size"
    )
  indices = np.sort(np.asarray(indices, dtype=np.int64))
  if labels is not None and len(indices):
    labels = np.asarray(labels)
    classes = np.unique(labels)
    counts = np.array([np.sum(labels[indices] == label) for label in classes])
    if counts.min() != counts.max():
      per_class = ", ".join(f"{label}: {count}" for label, count in zip(classes, counts))
      raise UserError(
        f"{path}: classes are unbalanced ({per_class}); use a split file with the same number of images per class"
      )
  return indices


def write_split_files(directory, indices):
  """Writes `labeled_indices.npy` and `labeled_indices.txt` (one index per line) into directory.

  Any tf.io.gfile path (local, gs://, ...); each file is replaced atomically (runtime.write_file).

  Returns:
    (npy_path, txt_path).
  """
  tf.io.gfile.makedirs(directory)
  indices = np.sort(np.asarray(indices, dtype=np.int64))
  npy_path = os.path.join(directory, "labeled_indices.npy")
  txt_path = os.path.join(directory, "labeled_indices.txt")
  npy_bytes = io.BytesIO()
  np.save(npy_bytes, indices)
  fileio.write_file(npy_path, npy_bytes.getvalue())
  fileio.write_file(txt_path, "".join(f"{index}\n" for index in indices))
  return npy_path, txt_path
