"""The labeled subset (METHOD.md section 4): drawn per class by the label seed (`select_labeled_indices`), read
from a split file of indices or image names (`read_split_file`), saved as index files (`write_split_files`)."""

import collections
from collections.abc import Sequence
import os

import numpy as np
import tensorflow as tf

from utils import fileio
from utils.data import datasets
from utils.errors import UserError


def select_labeled_indices(labels: Sequence[int], per_class: int, seed: int) -> np.ndarray:
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


def read_split_file(
  path: str,
  num_train: int,
  labels: Sequence[int] | None = None,
  expected_count: int | None = None,
  names: Sequence[str] | None = None,
  class_names: Sequence[str] | None = None,
  dataset: str | None = None,
  lines: Sequence[str] | None = None,
) -> np.ndarray:
  """Reads a labeled-subset file: one training index per line, or one image name per line (METHOD.md section 4).

  Indices are the format of the reference's `spc.4000_split.<seed>.txt`. Given `names`, a file whose lines
  are not all integers lists names: paths relative to the split folder (folder: `cat/img_001.jpg`) or bare
  file names (`n01440764_10026.JPEG`, as the reference's ImageNet subset files; TFRecord: image/filename).
  Unknown, ambiguous and repeated entries, a wrong count and unbalanced classes are errors.

  Args:
    path: the text file, on any tf.io.gfile file system.
    num_train: training-set size; every index must lie in [0, num_train).
    labels: optional training labels [num_train]; if given, every class must have the same count.
    expected_count: optional number of entries the file must hold.
    names: optional names of the training images, in index order (image_files.ImageFiles.names).
    class_names: optional names of the classes, for the message about unbalanced classes.
    dataset: optional data.dataset of the names, for the message about an unknown name.
    lines: optional entries given instead of the file's lines (`path` then only names them in messages).
  Returns:
    Sorted int64 indices.
  """
  if lines is None:
    if not datasets._is_file(path):
      raise UserError(f"split file {path} does not exist; check the path")
    with tf.io.gfile.GFile(path) as file:
      lines = list(file)
  lines = [(number, line.strip()) for number, line in enumerate(lines, start=1) if line.strip()]
  by_name = names is not None and not all(_is_integer(text) for _, text in lines)
  lookup = _name_lookup(names) if by_name else None
  indices, seen_at = [], {}
  for number, text in lines:
    if by_name:
      index, entry = _named_index(lookup, names, f"{path} line {number}", text, dataset), repr(text)
    else:
      index = _index(path, number, text, num_train)
      entry = f"index {index}"
    if index in seen_at:
      raise UserError(f"{path} line {number}: {entry} repeats line {seen_at[index]}; remove the duplicate")
    seen_at[index] = number
    indices.append(index)
  if expected_count is not None and len(indices) != expected_count:
    raise UserError(
      f"{path} holds {len(indices)} {'names' if by_name else 'indices'} but {expected_count} are expected; "
      "use a split file of the configured size (data.labeled_per_class x classes)"
    )
  indices = np.sort(np.asarray(indices, dtype=np.int64))
  if labels is not None and len(indices):
    labels = np.asarray(labels)
    classes = np.unique(labels)
    counts = np.array([np.sum(labels[indices] == label) for label in classes])
    if counts.min() != counts.max():
      shown = [class_names[label] for label in classes] if class_names is not None else classes
      per_class = ", ".join(f"{name}: {count}" for name, count in zip(shown, counts))
      raise UserError(
        f"{path}: classes are unbalanced ({per_class}); use a split file with the same number of images per class"
      )
  return indices


def _is_integer(text):
  try:
    int(text)
  except ValueError:
    return False
  return True


def _index(path, number, text, num_train):
  """The training index on line `number`."""
  try:
    index = int(text)
  except ValueError:
    raise UserError(
      f"{path} line {number}: {text!r} is not an integer; the file must hold one training index per line"
    ) from None
  if not 0 <= index < num_train:
    raise UserError(
      f"{path} line {number}: index {index} is outside [0, {num_train}); use a split file made for this training set"
    )
  return index


def _name_lookup(names):
  """{relative name or bare file name: [indices]} of the training images."""
  found = collections.defaultdict(list)
  for index, name in enumerate(names):
    found[name].append(index)
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    if base != name:
      found[base].append(index)
  return found


def _named_index(lookup, names, line, text, dataset):
  """The training index of the image named `text` on `line` (PATH line N)."""
  candidates = lookup.get(text) or lookup.get(text.replace("\\", "/"))
  if not candidates:
    of_dataset = f" of data.dataset={dataset}" if dataset else ""
    raise UserError(
      f"{line}: {text!r} names no training image{of_dataset} (write paths relative to the train folder, "
      "or bare file names); use a split file made for this data"
    )
  if len(candidates) > 1:
    examples = ", ".join(names[index] for index in candidates[:2])
    raise UserError(f"{line}: {text!r} is ambiguous ({examples}); write the path instead")
  return candidates[0]


def write_split_files(npy_path: str, txt_path: str, indices: Sequence[int]) -> tuple[str, str]:
  """Writes the sorted indices as a .npy file and as a split file (one index per line, the reference's format).

  Any tf.io.gfile path (local, gs://, ...); each file is replaced atomically (fileio.write_file). The scripts
  pass their Workdir's labeled_indices_npy and labeled_indices.

  Returns:
    (npy_path, txt_path).
  """
  tf.io.gfile.makedirs(os.path.dirname(npy_path))
  indices = np.sort(np.asarray(indices, dtype=np.int64))
  fileio.write_npy(npy_path, indices)
  fileio.write_file(txt_path, "".join(f"{index}\n" for index in indices))
  return npy_path, txt_path
