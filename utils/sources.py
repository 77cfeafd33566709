"""Where the scripts' images come from: in-memory arrays, or image files streamed from disk (README: Your own data).

`open_source(config.data, data_dir)` returns a Source for every `data.dataset`:

  cifar10, digits  uint8 arrays in memory (utils/datasets.py), through the in-memory pipelines.
  folder           DATA_DIR/train/<class>/**.{jpg,jpeg,png} (classes = folder names, sorted), optional
                   DATA_DIR/val/<class>/... (nn_eval.py's queries) and DATA_DIR/unlabeled/** (extra
                   unlabeled images, never labeled). Images of any size.
  tfrecord         uncompressed TFRecord files of tf.train.Example with image/encoded (JPEG or PNG bytes)
                   and image/class/label (int64), as Model Garden's ImageNet conversion writes them;
                   image/filename, when present, names the record in split files. Files: the globs
                   data.train_files and data.val_files, relative to DATA_DIR (or absolute, gs:// too).

Streamed images are addressed by an index, as arrays are: a folder's training images in class then path
order, a TFRecord set's records in file then record order (files sorted by name). Every step's images are
the in-memory path's (pipeline.unlabeled_indices, pipeline.SupportSampler), so the order of a run is a
function of (seed, step) and a resumed run reads exactly what the interrupted one would have. A TFRecord
set is indexed once per script start (one sequential read of its files, in parallel over files: the byte
offset, label and name of every record); training then reads records by offset.

Only the images of a step are in memory. The labeled subset is decoded once before training starts (so
an unreadable labeled image is an error before anything is written); an unreadable unlabeled image met
while streaming stops the run with an error naming the file (`Source.stream_errors`), after which the
run resumes from its last checkpoint once the file is fixed or removed. Images are not skipped: a
skipped image would change every later batch.
"""

import collections
import concurrent.futures
import contextlib
import os
import threading

from absl import logging
import numpy as np
import tensorflow as tf

from utils import augment, datasets, pipeline
from utils.errors import UserError

STREAMED = ("folder", "tfrecord")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
IMAGE_KEY = "image/encoded"
LABEL_KEY = "image/class/label"
NAME_KEY = "image/filename"
LAYOUT_HELP = "README: Your own data"
# A TFRecord is a uint64 length and its uint32 CRC, the data, then the data's uint32 CRC.
_RECORD_HEADER_BYTES = 12
_RECORD_FRAME_BYTES = 16
_MISSING_LABEL = np.iinfo(np.int64).min


def _join(directory, pattern):
  """pattern if it is absolute or a URL (gs://...), else directory/pattern."""
  if "://" in pattern or os.path.isabs(pattern):
    return pattern
  return os.path.join(directory, pattern)


# --- Images on disk, addressed by index ----------------------------------------------------------


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

  def read(self, index):
    """Encoded bytes (scalar tf.string) of image `index` (a scalar int64 tensor), in graph code."""
    raise NotImplementedError

  def describe(self, index):
    """Where image `index` lives (scalar tf.string), for error messages."""
    raise NotImplementedError

  def location(self, index):
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
  """Records of TFRecord files, one per index, read by byte offset (records_index builds the index)."""

  def __init__(self, files, file_ids, offsets, lengths, names, labels):
    super().__init__(names, labels)
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
      raise OSError(f"{path} is shorter than when it was indexed; {pipeline.UNDECODABLE}")
    return data

  def read(self, index):
    serialized = tf.py_function(self._read_bytes, [index], tf.string)
    serialized.set_shape([])
    return tf.io.parse_single_example(serialized, {IMAGE_KEY: tf.io.FixedLenFeature([], tf.string)})[IMAGE_KEY]

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


# --- Class folders ----------------------------------------------------------------------------------


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


def list_class_folders(root, split, class_names=None):
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


# --- TFRecord files -------------------------------------------------------------------------------------


def _index_record_file(path):
  """(lengths, raw labels, names) of every record of one TFRecord file, in order."""
  features = {
    LABEL_KEY: tf.io.FixedLenFeature([], tf.int64, default_value=_MISSING_LABEL),
    NAME_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
    IMAGE_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
  }

  def parse(records):
    parsed = tf.io.parse_example(records, features)
    return tf.strings.length(records), parsed[LABEL_KEY], parsed[NAME_KEY], tf.strings.length(parsed[IMAGE_KEY])

  expected = f"tf.train.Example records with {IMAGE_KEY} (bytes) and {LABEL_KEY} (int64)"
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
  for key, missing in ((LABEL_KEY, labels == _MISSING_LABEL), (IMAGE_KEY, image_bytes == 0)):
    if missing.any():
      raise UserError(
        f"{path} record {int(np.argmax(missing))} has no {key}; the records must be {expected} "
        "(the layout of Model Garden's ImageNet conversion)"
      )
  base = os.path.basename(path)
  names = [name.decode() if name else f"{base}:{position}" for position, name in enumerate(names)]
  return lengths.astype(np.int64), labels.astype(np.int64), names


def index_records(pattern, what):
  """Indexes the TFRecord files matching `pattern`: one sequential read, in parallel over files.

  Args:
    pattern: glob of the files.
    what: the config field holding the pattern, for messages.
  Returns:
    (files, file_ids, offsets, lengths, names, raw labels), records in file then record order.
  """
  files = sorted(tf.io.gfile.glob(pattern))
  if not files:
    raise UserError(f"no TFRecord files match {pattern}; set {what} (a glob relative to --data_dir)")
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:
    per_file = list(pool.map(_index_record_file, files))
  file_ids, offsets, lengths, names, labels = [], [], [], [], []
  for file_id, (file_lengths, file_labels, file_names) in enumerate(per_file):
    frames = file_lengths + _RECORD_FRAME_BYTES
    offsets.append(np.cumsum(frames) - frames)
    file_ids.append(np.full(len(file_lengths), file_id, np.int64))
    lengths.append(file_lengths)
    labels.append(file_labels)
    names += file_names
  if not names:
    raise UserError(f"the TFRecord files matching {pattern} hold no records; check {what}")
  return files, *(np.concatenate(values) for values in (file_ids, offsets, lengths)), names, np.concatenate(labels)


def _first_line(error):
  message = getattr(error, "message", None) or str(error)
  return message.strip().splitlines()[0] if message.strip() else type(error).__name__


# --- Sources ---------------------------------------------------------------------------------------------


class Source:
  """A dataset as the entry scripts use it; see ArraySource and StreamSource.

  Attributes:
    name: data.dataset.
    class_names: one name per class.
    train_labels: int64 [num_train] labels of the images a labeled subset is drawn from; its indices
      are what labeled_indices.txt holds.
    num_unlabeled: images the unlabeled batches draw from (the training images first).
  """

  streamed = False

  @property
  def num_classes(self):
    return len(self.class_names)

  def read_split_file(self, path, expected_count=None, check_balance=True):
    """The labeled subset a split file lists (datasets.read_split_file: one index per line)."""
    return datasets.read_split_file(
      path, len(self.train_labels), labels=self.train_labels if check_balance else None, expected_count=expected_count
    )

  def check_images(self, indices):
    """Raises UserError naming the first of these training images that cannot be decoded."""

  def write_labeled_names(self, directory, indices):
    """Streamed sources: writes the labeled images' names next to their indices; returns the path or None."""

  def check_labeled_names(self, directory, indices):
    """Streamed sources: refuses indices whose images are no longer the ones paws_train.py labeled."""

  @contextlib.contextmanager
  def stream_errors(self, current_step, steps_per_call):
    """Streamed sources: an image that cannot be decoded during training becomes a UserError naming it."""
    yield

  def watch_steps(self, images, step_indices):
    """Streamed sources: step -> indices into `images` of the step's images, for stream_errors to search."""


class ArraySource(Source):
  """cifar10 and digits: uint8 arrays, through pipeline.pretrain_dataset and friends."""

  def __init__(self, name, train_images, train_labels, test_images, test_labels, class_names=None):
    self.name = name
    self.train_images, self.train_labels = train_images, np.asarray(train_labels, np.int64)
    self.test_images, self.test_labels = test_images, np.asarray(test_labels, np.int64)
    self.class_names = class_names or [str(label) for label in np.unique(self.train_labels)]
    self.num_unlabeled = len(self.train_images)

  def pretrain_dataset(self, labeled, data, pretrain, **steps):
    return pipeline.pretrain_dataset(self.train_images, labeled, self.train_labels[labeled], data, pretrain, **steps)

  def finetune_dataset(self, labeled, finetune, data, **steps):
    return pipeline.finetune_dataset(self.train_images[labeled], self.train_labels[labeled], finetune, data, **steps)

  def labeled_images(self, labeled, data):
    """The labeled images, whole and normalised, as one tensor (BatchNorm re-estimation)."""
    return augment.normalize(self.train_images[labeled], data.mean, data.std)

  def evaluation_sets(self, labeled, data, batch_size):
    """(support images, support labels, query images, query labels) for evaluation.evaluate."""
    del data, batch_size
    return self.train_images[labeled], self.train_labels[labeled], self.test_images, self.test_labels


class StreamSource(Source):
  """Image files (folder or tfrecord): decoded and augmented inside tf.data, step by step.

  Attributes:
    train: ImageFiles of the labeled-able training images (indices 0 .. num_train - 1).
    unlabeled: ImageFiles of the unlabeled images: train first, then extra unlabeled ones.
    evaluation: ImageFiles of the evaluation images, or None.
  """

  streamed = True

  def __init__(self, name, class_names, train, unlabeled, evaluation, evaluation_hint):
    self.name = name
    self.class_names = list(class_names)
    self.train, self.unlabeled, self.evaluation = train, unlabeled, evaluation
    self.train_labels = train.labels
    self.num_unlabeled = len(unlabeled)
    self.evaluation_hint = evaluation_hint
    self._step_images = None  # step -> image indices of that step, for stream_errors

  # -- Split files by name ------------------------------------------------------------------

  def read_split_file(self, path, expected_count=None, check_balance=True):
    """A labeled subset listed by index (one per line) or by file name.

    Names are paths relative to the split folder (folder: `cat/img_001.jpg`) or bare file names
    (`n01440764_10026.JPEG`, as the reference's ImageNet subset files; TFRecord: image/filename), one
    per line. Unknown, ambiguous and repeated names, a wrong count and unbalanced classes are errors.
    """
    if not tf.io.gfile.exists(path):
      raise UserError(f"split file {path} does not exist; check the path")
    with tf.io.gfile.GFile(path) as file:
      lines = [(number, line.strip()) for number, line in enumerate(file, start=1) if line.strip()]
    if all(_is_integer(text) for _, text in lines):
      return super().read_split_file(path, expected_count, check_balance)
    by_name = self._names_to_indices()
    indices, seen_at = [], {}
    for number, text in lines:
      candidates = by_name.get(text) or by_name.get(text.replace("\\", "/"))
      if not candidates:
        raise UserError(
          f"{path} line {number}: {text!r} names no training image of data.dataset={self.name} "
          "(write paths relative to the train folder, or bare file names); use a split file made for this data"
        )
      if len(candidates) > 1:
        examples = ", ".join(self.train.names[index] for index in candidates[:2])
        raise UserError(f"{path} line {number}: {text!r} is ambiguous ({examples}); write the path instead")
      index = candidates[0]
      if index in seen_at:
        raise UserError(f"{path} line {number}: {text!r} repeats line {seen_at[index]}; remove the duplicate")
      seen_at[index] = number
      indices.append(index)
    if expected_count is not None and len(indices) != expected_count:
      raise UserError(
        f"{path} holds {len(indices)} names but {expected_count} are expected; "
        "use a split file of the configured size (data.labeled_per_class x classes)"
      )
    indices = np.sort(np.asarray(indices, np.int64))
    if check_balance and len(indices):
      counts = np.bincount(self.train_labels[indices], minlength=self.num_classes)
      if counts.min() != counts.max():
        per_class = ", ".join(f"{name}: {count}" for name, count in zip(self.class_names, counts))
        raise UserError(
          f"{path}: classes are unbalanced ({per_class}); use a split file with the same number of images per class"
        )
    return indices

  def _names_to_indices(self):
    """{relative name or bare file name: [indices]} of the training images."""
    found = collections.defaultdict(list)
    for index, name in enumerate(self.train.names):
      found[name].append(index)
      base = name.replace("\\", "/").rsplit("/", 1)[-1]
      if base != name:
        found[base].append(index)
    return found

  def write_labeled_names(self, directory, indices):
    path = os.path.join(directory, "labeled_files.txt")
    with tf.io.gfile.GFile(path, "w") as file:
      file.write("".join(f"{self.train.names[index]}\n" for index in indices))
    return path

  def check_labeled_names(self, directory, indices):
    path = os.path.join(directory, "labeled_files.txt")
    if not tf.io.gfile.exists(path):
      return
    with tf.io.gfile.GFile(path) as file:
      saved = [line.rstrip("\n") for line in file if line.strip()]
    current = [self.train.names[index] for index in indices]
    if saved != current:
      changed = next((old, new) for old, new in zip(saved + [""], current + [""]) if old != new)
      raise UserError(
        f"{path} no longer matches the training images ({changed[0]!r} is now {changed[1]!r}): the images "
        "under --data_dir changed since paws_train.py ran; restore them or pre-train again in a new --workdir"
      )

  # -- Decoding checks ----------------------------------------------------------------------

  def _first_undecodable(self, images, indices):
    """(name, reason) of the first image of `indices` that does not decode, else None (one by one, eagerly)."""
    for index in indices:
      index = tf.constant(int(index), tf.int64)
      try:
        pipeline.decode_image(images.read(index), images.describe(index))
      except (tf.errors.OpError, OSError) as error:
        return images.location(index), _reason(error)
    return None

  def check_images(self, indices):
    """Decodes the training images `indices` (the labeled subset) once, in parallel; names a bad one."""
    dataset = tf.data.Dataset.from_tensor_slices(np.asarray(indices, np.int64))
    dataset = dataset.map(
      lambda index: tf.shape(pipeline.decode_image(self.train.read(index), self.train.describe(index))),
      num_parallel_calls=tf.data.AUTOTUNE,
    )
    try:
      for _ in dataset.batch(256):
        pass
    except (tf.errors.OpError, OSError):
      found = self._first_undecodable(self.train, indices)
      if found is None:
        raise
      name, reason = found
      raise UserError(
        f"cannot decode labeled image {name} ({reason}); replace it by a readable JPEG or PNG, or remove it"
      ) from None

  def watch_steps(self, images, step_indices):
    self._step_images = (images, step_indices)

  @contextlib.contextmanager
  def stream_errors(self, current_step, steps_per_call):
    """An image that fails to decode while training stops the run with a UserError naming it.

    tf.data raises a failed element's error when the consumer reaches it, in order, so the failing
    image is one of the steps the failed call was reading: [current_step(), + steps_per_call).
    """
    try:
      yield
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.UnknownError) as error:
      if self._step_images is None:
        raise
      step = current_step()
      images, step_indices = self._step_images
      for candidate_step in range(step, step + steps_per_call):
        found = self._first_undecodable(images, step_indices(candidate_step))
        if found is not None:
          name, reason = found
          raise UserError(
            f"cannot decode {name} ({reason}), an image of step {candidate_step + 1}; replace it by a readable "
            "JPEG or PNG of the same name (removing it would renumber the images), then re-run the same command: "
            "training resumes from the last checkpoint"
          ) from None
      raise error

  # -- Pipelines ---------------------------------------------------------------------------

  def pretrain_dataset(self, labeled, data, pretrain, *, replicas=pipeline.ONE_DEVICE, **steps):
    labeled = np.asarray(labeled, np.int64)
    labels = self.train_labels[labeled]
    p = pretrain
    sampler = pipeline.SupportSampler(**pipeline.pretrain_supports(labels, p, steps["seed"], replicas.total))

    def step_indices(step):  # all the step's images (every replica's), to find an undecodable one
      return np.concatenate(
        [
          pipeline.unlabeled_indices(len(self.unlabeled), p.batch_size, step, steps["seed"]),
          labeled[sampler.batch(step)],
        ]
      )

    self.watch_steps(self.unlabeled, step_indices)
    return pipeline.stream_pretrain_dataset(self.unlabeled, labeled, labels, data, pretrain, replicas=replicas, **steps)

  def finetune_dataset(self, labeled, finetune, data, *, replicas=pipeline.ONE_DEVICE, **steps):
    labeled = np.asarray(labeled, np.int64)
    labels = self.train_labels[labeled]
    sampler = pipeline.SupportSampler(**pipeline.finetune_supports(labels, finetune, steps["seed"], replicas.total))
    self.watch_steps(self.train, lambda step: labeled[sampler.batch(step)])
    return pipeline.stream_finetune_dataset(self.train, labeled, labels, finetune, data, replicas=replicas, **steps)

  def labeled_images(self, labeled, data):
    batches = pipeline.stream_eval_dataset(self.train, labeled, 256, data.image_size, data.mean, data.std)
    return tf.concat(list(batches), axis=0)

  def evaluation_sets(self, labeled, data, batch_size):
    """(support batches, support labels, query batches, query labels): tf.data datasets for evaluation.evaluate."""
    if self.evaluation is None:
      raise UserError(self.evaluation_hint)
    supports = pipeline.stream_eval_dataset(self.train, labeled, batch_size, data.image_size, data.mean, data.std)
    queries = pipeline.stream_eval_dataset(
      self.evaluation, np.arange(len(self.evaluation)), batch_size, data.image_size, data.mean, data.std
    )
    return supports, self.train_labels[labeled], queries, self.evaluation.labels


def _is_integer(text):
  try:
    int(text)
  except ValueError:
    return False
  return True


def _reason(error):
  """The useful part of a decoding error's message."""
  text = _first_line(error)
  if pipeline.UNDECODABLE in str(error):
    return f"it {pipeline.UNDECODABLE}"
  return text.split("[[", 1)[0].strip().rstrip(".") or type(error).__name__


def open_folder(root):
  """The folder layout (module docstring) as a StreamSource."""
  class_names, train = list_class_folders(root, "train")
  unlabeled = train
  extra_folder = os.path.join(root, "unlabeled")
  if tf.io.gfile.isdir(extra_folder):
    extra, _ = _image_files_under(extra_folder)
    if extra:
      unlabeled = FolderImages(
        train.paths + extra,
        list(train.names) + [os.path.relpath(path, root) for path in extra],
        np.r_[train.labels, np.full(len(extra), -1, np.int64)],
      )
  evaluation = None
  val_folder = os.path.join(root, "val")
  if tf.io.gfile.isdir(val_folder):
    _, evaluation = list_class_folders(root, "val", class_names)
  hint = f"{val_folder} not found: evaluation needs labeled images in {val_folder}/<class>/ ({LAYOUT_HELP})"
  counts = f"{len(train)} training images in {len(class_names)} classes"
  extra_count = len(unlabeled) - len(train)
  logging.info(
    f"folder {root}: {counts}"
    + (f", {extra_count} more unlabeled" if extra_count else "")
    + (f", {len(evaluation)} validation images" if evaluation is not None else "")
  )
  return StreamSource("folder", class_names, train, unlabeled, evaluation, hint)


def _record_images(root, pattern, what, class_values=None):
  """(class values, RecordImages) of the TFRecords matching root/pattern; labels mapped to class indices."""
  files, file_ids, offsets, lengths, names, raw_labels = index_records(_join(root, pattern), what)
  if class_values is None:
    class_values = np.unique(raw_labels)
  positions = np.clip(np.searchsorted(class_values, raw_labels), 0, len(class_values) - 1)
  unknown = class_values[positions] != raw_labels
  if unknown.any():
    raise UserError(
      f"{names[int(np.argmax(unknown))]} in {pattern} has label {raw_labels[np.argmax(unknown)]}, which no "
      "training record has; use validation records of the same classes"
    )
  return class_values, RecordImages(files, file_ids, offsets, lengths, names, positions)


def open_records(root, train_files, val_files, evaluation=True):
  """The TFRecord layout (module docstring) as a StreamSource; `evaluation` False skips the val files."""
  class_values, train = _record_images(root, train_files, "data.train_files")
  validation = None
  if evaluation:
    _, validation = _record_images(root, val_files, "data.val_files", class_values)
  logging.info(
    f"tfrecord {_join(root, train_files)}: {len(train)} training records in {len(class_values)} classes"
    + (f", {len(validation)} validation records" if validation is not None else "")
  )
  hint = f"no validation records: set data.val_files to a glob of them ({LAYOUT_HELP})"
  return StreamSource("tfrecord", [str(value) for value in class_values], train, train, validation, hint)


def open_source(data, data_dir, evaluation=False):
  """The Source of config.data.dataset.

  Args:
    data: the config's `data` section.
    data_dir: --data_dir (CIFAR-10 offline folder, or the root of folder / tfrecord data).
    evaluation: whether the evaluation images are needed (TFRecord validation files are indexed only then).
  """
  if data.dataset not in STREAMED:
    arrays = datasets.load_dataset(data.dataset, data_dir)
    return ArraySource(data.dataset, *arrays)
  if not data_dir:
    raise UserError(f"data.dataset={data.dataset} needs --data_dir=DIR, the folder holding the images ({LAYOUT_HELP})")
  if "://" not in data_dir and not tf.io.gfile.isdir(data_dir):
    raise UserError(f"data directory {data_dir} does not exist; fix --data_dir")
  if data.dataset == "folder":
    if not tf.io.gfile.isdir(os.path.join(data_dir, "train")):
      raise UserError(
        f"{os.path.join(data_dir, 'train')} not found: data.dataset=folder reads DIR/train/<class>/*.jpg "
        f"({LAYOUT_HELP})"
      )
    return open_folder(data_dir)
  return open_records(data_dir, data.train_files, data.val_files, evaluation)
