"""Datasets prepared by TensorFlow Datasets, read as the TFRecord files they are (data.dataset=tfds, docs/data.md).

TFDS writes each split as shards of tf.train.Example records: an Image feature as its encoded bytes, a
ClassLabel as int64, under the features' names (image_files.TFDS_KEYS). Only prepared data is read, by
the dataset's own metadata (dataset_info.json: file format, shards, split sizes, class names); nothing is
downloaded or prepared here. Records are then indexed and read by offset as any TFRecord files
(image_files.RecordImages), in the order of the split's shards (TFDS's file order, i.e. what
tfds.load(..., shuffle_files=False) yields).
"""

from collections.abc import Sequence
from typing import NamedTuple

from absl import logging
import numpy as np
import tensorflow as tf

from utils.data import image_files
from utils.errors import UserError

TRAIN_SPLIT = "train"
EVALUATION_SPLITS = ("validation", "test")  # ImageNet's "test" has no labels: "validation" first

# --split_file=tfds:NAME names the labeled subset by a prepared TFDS dataset (e.g. imagenet2012_subset/10pct).
SUBSET_PREFIX = "tfds:"


class TfdsImages(NamedTuple):
  """A prepared dataset's images: class names, training RecordImages, evaluation RecordImages (or None)."""

  class_names: list[str]
  train: image_files.RecordImages
  evaluation: image_files.RecordImages | None
  evaluation_split: str | None


def _builder(name, data_dir):
  """The prepared dataset `name` (NAME[/CONFIG][:VERSION]) in data_dir, read-only; UserError if not prepared."""
  import tensorflow_datasets as tfds  # only for data.dataset=tfds: TFDS takes seconds to import

  prepare = f"prepare it first: tfds build {name.split(':')[0]} --data_dir={data_dir} --file_format=tfrecord"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise UserError(
      f"TFDS dataset {name!r} is not prepared in {data_dir}, and TFDS has no dataset of that name; "
      "check data.tfds_name (NAME, NAME/CONFIG or NAME:VERSION) and --data_dir"
    ) from None
  except (ValueError, AssertionError) as error:  # unknown config or version
    raise UserError(f"TFDS dataset {name!r}: {image_files._first_line(error)}; check data.tfds_name") from None
  if not builder.is_prepared():
    raise UserError(f"TFDS dataset {name} is not prepared in {data_dir} ({builder.data_path} not found); {prepare}")
  if builder.info.file_format != tfds.core.FileFormat.TFRECORD:
    raise UserError(
      f"TFDS dataset {name} in {builder.data_dir} is prepared as {builder.info.file_format.value}, which cannot "
      f"be read by offset; {prepare}"
    )
  return builder


def _split_files(builder, split):
  """The shards of a whole split, in TFDS's order."""
  files = [str(path) for path in builder.info.splits[split].filepaths]
  if not builder.info.splits[split].num_examples:
    raise UserError(f"split {split} of TFDS dataset {builder.info.full_name} holds no examples; prepare it again")
  return files


def evaluation_split(splits: Sequence[str]) -> str | None:
  """The split nn_eval.py classifies: validation if the dataset has one, else test, else None."""
  return next((split for split in EVALUATION_SPLITS if split in splits), None)


def _split_images(builder, split, num_classes):
  """RecordImages of a split; labels must be classes (ImageNet's unlabeled test split has -1)."""
  files, file_ids, offsets, lengths, names, labels = image_files.index_record_files(
    _split_files(builder, split), image_files.TFDS_KEYS
  )
  expected = builder.info.splits[split].num_examples
  if len(labels) != expected:
    raise UserError(
      f"split {split} of {builder.data_dir} holds {len(labels)} records but its dataset_info.json says {expected}; "
      "prepare the dataset again"
    )
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    raise UserError(
      f"{names[int(np.argmax(bad))]} in split {split} of {builder.data_dir} has label {labels[np.argmax(bad)]}, "
      f"not a class (0 .. {num_classes - 1}); use a split with labels"
    )
  return image_files.RecordImages(files, file_ids, offsets, lengths, names, labels, image_files.TFDS_KEYS)


def open_tfds(name: str, data_dir: str, evaluation: bool = True) -> TfdsImages:
  """The train split (and, if `evaluation`, validation or test) of the prepared TFDS dataset `name`.

  Args:
    name: data.tfds_name: NAME, NAME/CONFIG, optionally :VERSION (else the newest prepared).
    data_dir: TFDS's data_dir (--data_dir), local or gs://.
    evaluation: whether to index the evaluation split too.
  """
  import tensorflow_datasets as tfds

  builder = _builder(name, data_dir)
  features = builder.info.features
  found = ", ".join(f"{key}: {type(feature).__name__}" for key, feature in features.items())
  for key, kind in (
    (image_files.TFDS_KEYS.image, tfds.features.Image),
    (image_files.TFDS_KEYS.label, tfds.features.ClassLabel),
  ):
    if key not in features or not isinstance(features[key], kind):
      raise UserError(
        f"TFDS dataset {name} has no {key!r} feature of type {kind.__name__} (its features: {found}); "
        f"data.dataset=tfds needs {image_files.TFDS_KEYS.layout}"
      )
  splits = list(builder.info.splits)
  if TRAIN_SPLIT not in splits:
    raise UserError(f"TFDS dataset {name} has no {TRAIN_SPLIT} split (its splits: {', '.join(splits)})")
  class_names = list(features[image_files.TFDS_KEYS.label].names)
  train = _split_images(builder, TRAIN_SPLIT, len(class_names))
  split = evaluation_split(splits)
  validation = _split_images(builder, split, len(class_names)) if evaluation and split else None
  logging.info(
    f"tfds {builder.info.full_name} in {builder.data_dir}: {len(train)} training records in {len(class_names)} "
    f"classes; evaluation split: {split or 'none'}"
    + (f" ({len(validation)} records)" if validation is not None else "")
  )
  return TfdsImages(class_names, train, validation, split)


def subset_names(subset: str, data_dir: str) -> list[str]:
  """The file_name of every record of the train split of the prepared TFDS dataset `subset`
  (e.g. imagenet2012_subset/10pct: the 10 % labels of SimCLR and PAWS), in record order."""
  builder = _builder(subset, data_dir)
  key = image_files.TFDS_KEYS.name
  if key not in builder.info.features:
    raise UserError(f"TFDS dataset {subset} has no {key!r} feature, so it names no images; use a subset with one")
  dataset = tf.data.TFRecordDataset(_split_files(builder, TRAIN_SPLIT)).batch(1024)
  dataset = dataset.map(lambda records: tf.io.parse_example(records, {key: tf.io.FixedLenFeature([], tf.string)})[key])
  return [name.decode() for batch in dataset for name in batch.numpy()]
