"""Where the scripts' images come from: in-memory arrays, or image files streamed from disk (README: Your own data).

`open_source(config.data, data_dir)` returns a Source for every `data.dataset`:

  cifar10, digits  ArraySource: uint8 arrays in memory (utils/data/datasets.py), through the in-memory pipelines.
  folder           StreamSource of DATA_DIR/train/<class>/**.{jpg,jpeg,png} (classes = folder names, sorted),
                   optional DATA_DIR/val/<class>/... (nn_eval.py's queries) and DATA_DIR/unlabeled/** (extra
                   unlabeled images, never labeled). Images of any size.
  tfrecord         StreamSource of uncompressed TFRecord files of tf.train.Example with image/encoded (JPEG or
                   PNG bytes) and image/class/label (int64), as Model Garden's ImageNet conversion writes them;
                   image/filename, when present, names the record in split files. Files: the globs
                   data.train_files and data.val_files, relative to DATA_DIR (or absolute, gs:// too).
  tfds             StreamSource of the TFRecord shards of the TFDS dataset data.tfds_name prepared in DATA_DIR
                   (TFDS's data_dir): its train split, validation or test for evaluation, class names from
                   its ClassLabel; file_name names the record in split files, and --split_file=tfds:SUBSET
                   takes the labeled subset from another prepared dataset's file names (utils/data/tfds_data.py).

A Source gives the scripts what they need of their data whatever its form: the training labels and image
names (split files), the stages' input pipelines for an index plan (utils/data/sampling.py: which images
every step reads, the same plan for arrays and files, so a resumed run reads exactly what the interrupted one
would have), the evaluation sets, and the checks of image files: the labeled subset is decoded once before
training starts (so an unreadable labeled image is an error before anything is written); an unreadable
unlabeled image met while streaming stops the run with an error naming the file (`Source.stream_errors`,
which searches the plan's steps), after which the run resumes from its last checkpoint once the file is fixed
or removed. Images are not skipped: a skipped image would change every later batch. How the files are listed,
indexed and read: utils/data/image_files.py.
"""

from collections.abc import Callable, Iterator, Sequence
import contextlib
import functools
import os

from absl import logging
from ml_collections import ConfigDict
import numpy as np
import tensorflow as tf

from utils import config_rules
from utils.data import augment, datasets, decoding, image_files, pipelines, sampling, splits, tfds_data
from utils.errors import UserError

STREAMED = config_rules.STREAMED_DATASETS

# How evaluation prepares image files (soft-NN supports and queries, the classifier's queries and held-out
# images): the reference's Resize + CenterCrop. Arrays (cifar10, digits) are evaluated whole, as they are.
EVALUATION_TRANSFORM = decoding.resize_centre_crop


def _join(directory, pattern):
  """pattern if it is absolute or a URL (gs://...), else directory/pattern."""
  if "://" in pattern or os.path.isabs(pattern):
    return pattern
  return os.path.join(directory, pattern)


class Source:
  """A dataset as the entry scripts use it; see ArraySource and StreamSource.

  Attributes:
    name: data.dataset.
    class_names: one name per class.
    train_labels: int64 [num_train] labels of the images a labeled subset is drawn from; its indices
      are what labeled_indices.txt holds.
    train_names: names of those images for split files (streamed sources), else None.
    num_unlabeled: images the unlabeled batches draw from (the training images first).
  """

  streamed = False
  train_names = None
  # tfds: the names a prepared TFDS dataset lists (tfds_data.subset_names of its name), for --split_file=tfds:NAME.
  subset_names = None

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def read_split_file(self, path: str, expected_count: int | None = None, check_balance: bool = True) -> np.ndarray:
    """The labeled subset a split file lists: indices, or for streamed sources names (splits.read_split_file);
    tfds:NAME lists the file names of the prepared TFDS dataset NAME (data.dataset=tfds)."""
    lines = None
    if path.startswith(tfds_data.SUBSET_PREFIX):
      if self.subset_names is None:
        raise UserError(f"{path} names a TFDS dataset's images: it needs data.dataset=tfds, not {self.name}")
      lines = self.subset_names(path[len(tfds_data.SUBSET_PREFIX) :])
    return splits.read_split_file(
      path,
      len(self.train_labels),
      labels=self.train_labels if check_balance else None,
      expected_count=expected_count,
      names=self.train_names,
      class_names=self.class_names,
      dataset=self.name,
      lines=lines,
    )

  def check_images(self, indices: Sequence[int]) -> None:
    """Raises UserError naming the first of these training images that cannot be decoded."""

  def write_labeled_names(self, path: str, indices: Sequence[int]) -> str | None:
    """Streamed sources: writes the labeled images' names (Workdir.labeled_files); returns the path or None."""

  def check_labeled_names(self, path: str, indices: Sequence[int]) -> None:
    """Streamed sources: refuses indices whose images are no longer the ones paws_train.py labeled (`path`)."""

  def saved_subset(self, indices_path: str, names_path: str) -> np.ndarray:
    """The labeled subset paws_train.py saved (Workdir.labeled_indices, .labeled_files), still naming the same
    images; fine_tune.py and nn_eval.py read it."""
    if not tf.io.gfile.exists(indices_path):
      raise UserError(f"{indices_path} not found; run paws_train.py with this --workdir first")
    labeled = splits.read_split_file(indices_path, len(self.train_labels))
    self.check_labeled_names(names_path, labeled)
    return labeled

  @contextlib.contextmanager
  def stream_errors(
    self, plan: sampling.IndexPlan, current_step: Callable[[], int], steps_per_call: int
  ) -> Iterator[None]:
    """Streamed sources: an image of `plan` that cannot be decoded during training becomes a UserError naming it."""
    yield


class ArraySource(Source):
  """cifar10 and digits: uint8 arrays, through the in-memory pipelines."""

  def __init__(self, name, train_images, train_labels, test_images, test_labels, class_names=None):
    self.name = name
    self.train_images, self.train_labels = train_images, np.asarray(train_labels, np.int64)
    self.test_images, self.test_labels = test_images, np.asarray(test_labels, np.int64)
    self.class_names = class_names or [str(label) for label in np.unique(self.train_labels)]
    self.num_unlabeled = len(self.train_images)

  def pretrain_dataset(
    self, plan: sampling.PawsPlan, data: ConfigDict, pretrain: ConfigDict, **steps
  ) -> tf.data.Dataset:
    """pipelines.pretrain_dataset of the training images; steps: start_step, total_steps, replicas."""
    return pipelines.pretrain_dataset(self.train_images, plan, data, pretrain, **steps)

  def finetune_dataset(
    self, plan: sampling.SuncetPlan, finetune: ConfigDict, data: ConfigDict, **steps
  ) -> tf.data.Dataset:
    """pipelines.finetune_dataset of the training images; steps: start_step, total_steps, replicas."""
    return pipelines.finetune_dataset(self.train_images, plan, finetune, data, **steps)

  def classifier_dataset(self, plan: sampling.ClassifierPlan, data: ConfigDict, **steps) -> tf.data.Dataset:
    """pipelines.classifier_dataset of the training images; steps: start_step, total_steps, replicas."""
    return pipelines.classifier_dataset(self.train_images, plan, data, **steps)

  def labeled_images(self, labeled: Sequence[int], data: ConfigDict) -> tf.Tensor:
    """The labeled images, whole and normalised, as one tensor (BatchNorm re-estimation)."""
    return augment.normalize(self.train_images[labeled], data.mean, data.std)

  def evaluation_sets(self, labeled: Sequence[int], data: ConfigDict, batch_size: int) -> tuple:
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

  def __init__(self, name, class_names, train, unlabeled, evaluation, evaluation_hint, subset_names=None):
    self.name = name
    self.subset_names = subset_names
    self.class_names = list(class_names)
    self.train, self.unlabeled, self.evaluation = train, unlabeled, evaluation
    self.train_labels = train.labels
    self.train_names = train.names
    self.num_unlabeled = len(unlabeled)
    self.evaluation_hint = evaluation_hint

  # -- Labeled names ------------------------------------------------------------------------

  def write_labeled_names(self, path, indices):
    with tf.io.gfile.GFile(path, "w") as file:
      file.write("".join(f"{self.train.names[index]}\n" for index in indices))
    return path

  def check_labeled_names(self, path, indices):
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
        decoding.decode_image(images.read(index), images.describe(index))
      except (tf.errors.OpError, OSError) as error:
        return images.location(index), _reason(error)
    return None

  def check_images(self, indices):
    """Decodes the training images `indices` (the labeled subset) once, in parallel; names a bad one."""
    dataset = tf.data.Dataset.from_tensor_slices(np.asarray(indices, np.int64))
    dataset = dataset.map(
      lambda index: tf.shape(decoding.decode_image(self.train.read(index), self.train.describe(index))),
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

  @contextlib.contextmanager
  def stream_errors(self, plan, current_step, steps_per_call):
    """An image that fails to decode while training stops the run with a UserError naming it.

    tf.data raises a failed element's error when the consumer reaches it, in order, so the failing
    image is one of the steps the failed call was reading: [current_step(), + steps_per_call) of `plan`.
    """
    try:
      yield
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.UnknownError) as error:
      step = current_step()
      for candidate_step in range(step, step + steps_per_call):
        # Every plan's indices point into the unlabeled images, whose first ones are the training images.
        found = self._first_undecodable(self.unlabeled, plan.step_images(candidate_step))
        if found is not None:
          name, reason = found
          raise UserError(
            f"cannot decode {name} ({reason}), an image of step {candidate_step + 1}; replace it by a readable "
            "JPEG or PNG of the same name (removing it would renumber the images), then re-run the same command: "
            "training resumes from the last checkpoint"
          ) from None
      raise error

  # -- Pipelines ---------------------------------------------------------------------------

  def pretrain_dataset(self, plan, data, pretrain, **steps):
    return pipelines.stream_pretrain_dataset(self.unlabeled, plan, data, pretrain, **steps)

  def finetune_dataset(self, plan, finetune, data, **steps):
    return pipelines.stream_finetune_dataset(self.train, plan, finetune, data, **steps)

  def classifier_dataset(self, plan, data, **steps):
    return pipelines.classifier_dataset(self.train, plan, data, **steps)

  def labeled_images(self, labeled, data):
    return tf.concat(list(pipelines.stream_eval_dataset(self.train, labeled, data, 256)), axis=0)

  def evaluation_sets(self, labeled, data, batch_size):
    """(support batches, support labels, query batches, query labels): tf.data datasets for evaluation.evaluate.

    Supports and queries are the reference's evaluation images: Resize(S * 256 / 224) + CenterCrop(S)
    (decoding.resize_centre_crop; S = data.image_size), as the classifier's evaluation.
    """
    if self.evaluation is None:
      raise UserError(self.evaluation_hint)
    transform = EVALUATION_TRANSFORM
    supports = pipelines.stream_eval_dataset(self.train, labeled, data, batch_size, transform)
    queries = pipelines.stream_eval_dataset(
      self.evaluation, np.arange(len(self.evaluation)), data, batch_size, transform
    )
    return supports, self.train_labels[labeled], queries, self.evaluation.labels


def _reason(error):
  """The useful part of a decoding error's message."""
  text = image_files._first_line(error)
  if decoding.UNDECODABLE in str(error):
    return f"it {decoding.UNDECODABLE}"
  return text.split("[[", 1)[0].strip().rstrip(".") or type(error).__name__


def open_folder(root: str) -> StreamSource:
  """The folder layout (module docstring) as a StreamSource."""
  class_names, train = image_files.list_class_folders(root, "train")
  unlabeled = train
  extra_folder = os.path.join(root, "unlabeled")
  if tf.io.gfile.isdir(extra_folder):
    extra, _ = image_files._image_files_under(extra_folder)
    if extra:
      unlabeled = image_files.FolderImages(
        train.paths + extra,
        list(train.names) + [os.path.relpath(path, root) for path in extra],
        np.r_[train.labels, np.full(len(extra), -1, np.int64)],
      )
  evaluation = None
  val_folder = os.path.join(root, "val")
  if tf.io.gfile.isdir(val_folder):
    _, evaluation = image_files.list_class_folders(root, "val", class_names)
  hint = f"{val_folder} not found: evaluation needs labeled images in {val_folder}/<class>/ ({image_files.LAYOUT_HELP})"
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
  files, file_ids, offsets, lengths, names, raw_labels = image_files.index_records(_join(root, pattern), what)
  if class_values is None:
    class_values = np.unique(raw_labels)
  positions = np.clip(np.searchsorted(class_values, raw_labels), 0, len(class_values) - 1)
  unknown = class_values[positions] != raw_labels
  if unknown.any():
    raise UserError(
      f"{names[int(np.argmax(unknown))]} in {pattern} has label {raw_labels[np.argmax(unknown)]}, which no "
      "training record has; use validation records of the same classes"
    )
  return class_values, image_files.RecordImages(files, file_ids, offsets, lengths, names, positions)


def open_records(root: str, train_files: str, val_files: str, evaluation: bool = True) -> StreamSource:
  """The TFRecord layout (module docstring) as a StreamSource; `evaluation` False skips the val files."""
  class_values, train = _record_images(root, train_files, "data.train_files")
  validation = None
  if evaluation:
    _, validation = _record_images(root, val_files, "data.val_files", class_values)
  logging.info(
    f"tfrecord {_join(root, train_files)}: {len(train)} training records in {len(class_values)} classes"
    + (f", {len(validation)} validation records" if validation is not None else "")
  )
  hint = f"no validation records: set data.val_files to a glob of them ({image_files.LAYOUT_HELP})"
  return StreamSource("tfrecord", [str(value) for value in class_values], train, train, validation, hint)


def open_tfds(name: str, data_dir: str, evaluation: bool = True) -> StreamSource:
  """The prepared TFDS dataset `name` (module docstring) as a StreamSource; `evaluation` False skips its
  evaluation split."""
  images = tfds_data.open_tfds(name, data_dir, evaluation)
  if images.evaluation_split:
    hint = f"evaluation needs the {images.evaluation_split} split: nn_eval.py indexes it"
  else:
    hint = f"TFDS dataset {name} has no {' or '.join(tfds_data.EVALUATION_SPLITS)} split to evaluate on"
  subset_names = functools.partial(tfds_data.subset_names, data_dir=data_dir)
  return StreamSource("tfds", images.class_names, images.train, images.train, images.evaluation, hint, subset_names)


def open_source(data: ConfigDict, data_dir: str | None, evaluation: bool = False) -> Source:
  """The Source of config.data.dataset.

  Args:
    data: the config's `data` section.
    data_dir: --data_dir (CIFAR-10 offline folder, the root of folder / tfrecord data, or TFDS's data_dir).
    evaluation: whether the evaluation images are needed (TFRecord validation files are indexed only then).
  """
  if data.dataset not in STREAMED:
    arrays = datasets.load_dataset(data.dataset, data_dir)
    return ArraySource(data.dataset, *arrays)
  if not data_dir:
    raise UserError(
      f"data.dataset={data.dataset} needs --data_dir=DIR, the folder holding the images ({image_files.LAYOUT_HELP})"
    )
  if "://" not in data_dir and not tf.io.gfile.isdir(data_dir):
    raise UserError(f"data directory {data_dir} does not exist; fix --data_dir")
  if data.dataset == "tfds":
    return open_tfds(data.tfds_name, data_dir, evaluation)
  if data.dataset == "folder":
    if not tf.io.gfile.isdir(os.path.join(data_dir, "train")):
      raise UserError(
        f"{os.path.join(data_dir, 'train')} not found: data.dataset=folder reads DIR/train/<class>/*.jpg "
        f"({image_files.LAYOUT_HELP})"
      )
    return open_folder(data_dir)
  return open_records(data_dir, data.train_files, data.val_files, evaluation)
