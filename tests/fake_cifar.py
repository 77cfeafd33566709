"""Fake CIFAR-10 batches, folders and archives in the official format, built by the tests themselves."""

import builtins
import hashlib
import os
import pickle
import struct
import tarfile

import numpy as np

from utils.data import datasets

IMAGES_PER_BATCH = 4
BATCH_NAMES = [f"data_batch_{number}" for number in range(1, 6)] + ["test_batch"]


class Python2StylePickler(pickle._Pickler):
  """Writes bytes as Python 2 `str` opcodes, as the official CIFAR pickles do.

  Python 3's protocol 2 would route bytes through `_codecs.encode`, a global the real files never
  use (and the loader rightly refuses).
  """

  dispatch = dict(pickle._Pickler.dispatch)

  def _save_bytes_as_str(self, obj):
    if len(obj) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
    else:
      self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
    self.memoize(obj)

  dispatch[bytes] = _save_bytes_as_str


class WritesMarker:
  """Unpickling this calls open(marker, "w"): proof that a pickle was (wrongly) loaded."""

  def __init__(self, marker_path):
    self.marker_path = marker_path

  def __reduce__(self):
    return (builtins.open, (self.marker_path, "w"))


def row(global_index):
  # Distinct per image, plane and position, so any transposition or reordering shows.
  positions = np.arange(3072)
  return ((positions % 1024 + 85 * (positions // 1024) + 7 * global_index) % 256).astype(np.uint8)


def label(global_index):
  return (3 * global_index + 1) % 10


def write_batch(path, first_index, payload=None):
  indices = range(first_index, first_index + IMAGES_PER_BATCH)
  batch = {
    b"batch_label": b"fake",
    b"labels": [label(index) for index in indices],
    b"data": np.stack([row(index) for index in indices]),
  }
  if payload is not None:
    batch[b"payload"] = payload
  with open(path, "wb") as file:
    Python2StylePickler(file, protocol=2).dump(batch)


def make_folder(root, malicious_marker=None, skip=()):
  """Writes a fake cifar-10-batches-py/ under root; train images get global indices 0..19."""
  folder = os.path.join(root, datasets.CIFAR10_FOLDER)
  os.makedirs(folder)
  for batch_number, name in enumerate(BATCH_NAMES):
    if name in skip:
      continue
    payload = WritesMarker(malicious_marker) if malicious_marker and batch_number == 0 else None
    first_index = 100 if name == "test_batch" else IMAGES_PER_BATCH * batch_number
    write_batch(os.path.join(folder, name), first_index, payload)
  with open(os.path.join(folder, "batches.meta"), "wb") as file:
    pickle.dump({b"label_names": [b"class"] * 10}, file, protocol=2)
  return folder


def make_archive(root, **folder_options):
  """Writes root/cifar-10-python.tar.gz from a fake folder built elsewhere; returns (path, md5)."""
  folder = make_folder(os.path.join(root, "build"), **folder_options)
  archive_dir = os.path.join(root, "data")
  os.makedirs(archive_dir)
  archive_path = os.path.join(archive_dir, datasets.CIFAR10_ARCHIVE)
  with tarfile.open(archive_path, "w:gz") as archive:
    archive.add(folder, arcname=datasets.CIFAR10_FOLDER)
  return archive_path, md5(archive_path)


def md5(path):
  with open(path, "rb") as file:
    return hashlib.md5(file.read()).hexdigest()
