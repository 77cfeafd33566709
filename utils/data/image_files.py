"""Encoded images on disk, addressed by index: image folders and TFRecord files (README: Your own data).

`ImageFiles` holds N images' names and labels and reads an image's bytes inside tf.data by its index:
`FolderImages` one file per index (`list_class_folders` lists DATA_DIR/<split>/<class>/**.{jpg,jpeg,png}, in
class then path order), `RecordImages` one record of a TFRecord file per index (features named by RecordKeys:
Model Garden's or TFDS's; `index_records` / `index_record_files` index the
files once per script start, one sequential read in parallel over files: the byte offset, label and name of
every record, in file then record order; training then reads records by offset). Indices are those of the
in-memory arrays' pipelines (utils/data/sampling.py's plans), so the order of a run is a function of
(seed, step) whatever the images' form. Which folders and files make a dataset: utils/data/sources.py.
"""

import concurrent.futures
import os
import threading
from typing import NamedTuple

from absl import logging
import numpy as np
import tensorflow as tf

from utils.data import decoding
from utils.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


IMAGE_KEY = "image/encoded"


LABEL_KEY = "image/class/label"


NAME_KEY = "image/filename"


class RecordKeys(NamedTuple):
  """The tf.train.Example features of a TFRecord layout: encoded image, int64 label, optional name."""

  image: str
  label: str
  name: str
  layout: str  # what writes records like these, for messages


MODEL_GARDEN_KEYS = RecordKeys(IMAGE_KEY, LABEL_KEY, NAME_KEY, "the layout of Model Garden's ImageNet conversion")


# TensorFlow Datasets serializes an Image feature as its encoded bytes and a ClassLabel as int64, under the
# features' names (utils/data/tfds_data.py).
TFDS_KEYS = RecordKeys("image", "label", "file_name", "a TFDS dataset with image and label features")


LAYOUT_HELP = "README: Your own data"


# A TFRecord is a uint64 length and its uint32 CRC, the data, then the data's uint32 CRC.
_RECORD_HEADER_BYTES = 12


_RECORD_FRAME_BYTES = 16


_MISSING_LABEL = np.iinfo(np.int64).min


class ImageFiles:
  """N encoded images on disk: labels, names for split files, and their bytes read inside tf.data.

  Attributes:
    names: str [N], how split files and messages name each image (folder: path relative to the split
      folder; TFRecord: image/filename, or FILE:RECORD).
    labels: int64 [N] class indices (-1: unlabeled only).
  """

  def __init__(self, names, labels):
    self.names = np.asarray(names, dtype=object)
    self.labels = np.asarray(labels, dtype=np.int64)

  def __len__(self):
    return len(self.labels)

  def read(self, index: tf.Tensor) -> tf.Tensor:
    """Encoded bytes (scalar tf.string) of image `index` (a scalar int64 tensor), in graph code."""
    raise NotImplementedError

  def describe(self, index: tf.Tensor) -> tf.Tensor:
    """Where image `index` lives (scalar tf.string), for error messages."""
    raise NotImplementedError

  def location(self, index: int) -> str:
    """Where image `index` lives, as Python text."""
    return self.describe(tf.constant(index, tf.int64)).numpy().decode()


class FolderImages(ImageFiles):
  """Image files, one per index."""

  def __init__(self, paths, names, labels):
    super().__init__(names, labels)
    self.paths = list(paths)
    self._paths = tf.constant(self.paths or [""], tf.string)

  def read(self, index):
    return tf.io.read_file(tf.gather(self._paths, index))

  def describe(self, index):
    return tf.gather(self._paths, index)


class RecordImages(ImageFiles):
  """Records of TFRecord files, one per index, read by byte offset (index_records builds the index)."""

  def __init__(self, files, file_ids, offsets, lengths, names, labels, keys=MODEL_GARDEN_KEYS):
    super().__init__(names, labels)
    self.keys = keys
    self.files = list(files)
    self.file_ids = np.asarray(file_ids, np.int64)
    self.offsets = np.asarray(offsets, np.int64)
    self.lengths = np.asarray(lengths, np.int64)
    self._files = tf.constant(self.files or [""], tf.string)
    self._positions = tf.constant(_positions_in_files(self.file_ids), tf.int64)
    self._file_ids = tf.constant(self.file_ids, tf.int64)
    self._lock = threading.Lock()
    self._descriptors = {}  # local files: one descriptor shared by all threads (os.pread needs no seek)
    self._local = threading.local()  # other file systems: a GFile per thread

  def _read_bytes(self, index):
    index = int(index)
    path = self.files[self.file_ids[index]]
    offset, length = int(self.offsets[index]) + _RECORD_HEADER_BYTES, int(self.lengths[index])
    if "://" in path:
      handles = self._local.__dict__.setdefault("handles", {})
      if path not in handles:
        handles[path] = tf.io.gfile.GFile(path, "rb")
      handles[path].seek(offset)
      data = handles[path].read(length)
    else:
      with self._lock:
        if path not in self._descriptors:
          self._descriptors[path] = os.open(path, os.O_RDONLY)
        descriptor = self._descriptors[path]
      data = os.pread(descriptor, length, offset)
    if len(data) != length:
      raise OSError(f"{path} is shorter than when it was indexed; {decoding.UNDECODABLE}")
    return data

  def read(self, index):
    serialized = tf.py_function(self._read_bytes, [index], tf.string)
    serialized.set_shape([])
    image = self.keys.image
    return tf.io.parse_single_example(serialized, {image: tf.io.FixedLenFeature([], tf.string)})[image]

  def describe(self, index):
    position = tf.strings.as_string(tf.gather(self._positions, index))
    return tf.strings.join([tf.gather(self._files, tf.gather(self._file_ids, index)), " record ", position])


def _positions_in_files(file_ids):
  """The position of each record within its file, for file_ids in file order."""
  file_ids = np.asarray(file_ids, np.int64)
  if not len(file_ids):
    return np.zeros([0], np.int64)
  starts = np.flatnonzero(np.r_[True, file_ids[1:] != file_ids[:-1]])
  lengths = np.diff(np.r_[starts, len(file_ids)])
  return np.arange(len(file_ids)) - np.repeat(starts, lengths)


def _image_files_under(folder):
  """(sorted image paths under folder, at any depth; number of other files)."""
  images, others = [], 0
  for directory, _, files in tf.io.gfile.walk(folder):
    for name in files:
      if name.lower().endswith(IMAGE_EXTENSIONS):
        images.append(os.path.join(directory, name))
      else:
        others += 1
  return sorted(images), others


def list_class_folders(root: str, split: str, class_names: list[str] | None = None) -> tuple[list[str], FolderImages]:
  """Lists ROOT/split/<class>/** images.

  Args:
    root: the data directory.
    split: "train" or "val".
    class_names: the training classes; None to take this split's folders as the classes.
  Returns:
    (class names, FolderImages) with images in class order, then path order.
  """
  split_folder = os.path.join(root, split)
  found = sorted(name.rstrip("/") for name in tf.io.gfile.listdir(split_folder))
  folders = [name for name in found if tf.io.gfile.isdir(os.path.join(split_folder, name))]
  if not folders:
    raise UserError(
      f"{split_folder} has no class folders; put each class's images in {split_folder}/<class>/ ({LAYOUT_HELP})"
    )
  if class_names is None:
    class_names = folders
  paths, names, labels, ignored = [], [], [], 0
  for folder in folders:
    if folder not in class_names:
      raise UserError(
        f"{split_folder}/{folder} is not a class of {os.path.join(root, 'train')} "
        f"({', '.join(class_names[:5])}{', ...' if len(class_names) > 5 else ''}); rename or remove it"
      )
    images, others = _image_files_under(os.path.join(split_folder, folder))
    ignored += others
    if not images:
      raise UserError(
        f"class folder {split_folder}/{folder} holds no {', '.join(IMAGE_EXTENSIONS)} images; "
        "add images or remove the folder"
      )
    paths += images
    names += [os.path.relpath(path, split_folder) for path in images]
    labels += [class_names.index(folder)] * len(images)
  if ignored:
    logging.info(f"{split_folder}: ignored {ignored} files without a {'/'.join(IMAGE_EXTENSIONS)} extension")
  return class_names, FolderImages(paths, names, labels)


def _index_record_file(path, keys):
  """(lengths, raw labels, names) of every record of one TFRecord file, in order."""
  features = {
    keys.label: tf.io.FixedLenFeature([], tf.int64, default_value=_MISSING_LABEL),
    keys.name: tf.io.FixedLenFeature([], tf.string, default_value=""),
    keys.image: tf.io.FixedLenFeature([], tf.string, default_value=""),
  }

  def parse(records):
    parsed = tf.io.parse_example(records, features)
    return tf.strings.length(records), parsed[keys.label], parsed[keys.name], tf.strings.length(parsed[keys.image])

  expected = f"tf.train.Example records with {keys.image} (bytes) and {keys.label} (int64)"
  lengths, labels, names, image_bytes = [], [], [], []
  try:
    for batch in tf.data.TFRecordDataset(path).batch(1024).map(parse):
      for values, part in zip((lengths, labels, names, image_bytes), batch):
        values.append(part.numpy())
  except tf.errors.DataLossError as error:
    raise UserError(
      f"{path} is not an uncompressed TFRecord file or is damaged ({_first_line(error)}); "
      "the files must be uncompressed TFRecords (random access by offset)"
    ) from None
  except tf.errors.InvalidArgumentError as error:
    raise UserError(f"{path}: the records must be {expected} ({_first_line(error)})") from None
  if not lengths:
    return np.zeros([0], np.int64), np.zeros([0], np.int64), []
  lengths, labels, names, image_bytes = (np.concatenate(values) for values in (lengths, labels, names, image_bytes))
  for key, missing in ((keys.label, labels == _MISSING_LABEL), (keys.image, image_bytes == 0)):
    if missing.any():
      raise UserError(
        f"{path} record {int(np.argmax(missing))} has no {key}; the records must be {expected} ({keys.layout})"
      )
  base = os.path.basename(path)
  names = [name.decode() if name else f"{base}:{position}" for position, name in enumerate(names)]
  return lengths.astype(np.int64), labels.astype(np.int64), names


def index_records(pattern: str, what: str) -> tuple:
  """Indexes the TFRecord files matching `pattern` (MODEL_GARDEN_KEYS), as index_record_files.

  Args:
    pattern: glob of the files.
    what: the config field holding the pattern, for messages.
  """
  files = sorted(tf.io.gfile.glob(pattern))
  if not files:
    raise UserError(f"no TFRecord files match {pattern}; set {what} (a glob relative to --data_dir)")
  indexed = index_record_files(files, MODEL_GARDEN_KEYS)
  if not indexed[4]:
    raise UserError(f"the TFRecord files matching {pattern} hold no records; check {what}")
  return indexed


def index_record_files(files: list[str], keys: RecordKeys) -> tuple:
  """Indexes TFRecord files: one sequential read, in parallel over files.

  Args:
    files: the files, in the order that numbers their records.
    keys: the records' features.
  Returns:
    (files, file_ids, offsets, lengths, names, raw labels), records in file then record order.
  """
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, max(1, len(files)))) as pool:
    per_file = list(pool.map(lambda path: _index_record_file(path, keys), files))
  file_ids, offsets, lengths, names, labels = [], [], [], [], []
  for file_id, (file_lengths, file_labels, file_names) in enumerate(per_file):
    frames = file_lengths + _RECORD_FRAME_BYTES
    offsets.append(np.cumsum(frames) - frames)
    file_ids.append(np.full(len(file_lengths), file_id, np.int64))
    lengths.append(file_lengths)
    labels.append(file_labels)
    names += file_names
  return files, *(np.concatenate(values) for values in (file_ids, offsets, lengths)), names, np.concatenate(labels)


def _first_line(error):
  message = getattr(error, "message", None) or str(error)
  return message.strip().splitlines()[0] if message.strip() else type(error).__name__
