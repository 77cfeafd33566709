"""data.dataset=tfds: datasets prepared by TensorFlow Datasets, streamed from their TFRecord shards.

Tiny datasets are prepared here, offline, by builders defined in this file (digits images of 3 classes);
the scripts, in subprocesses, read them from their files alone (TFDS's read-only builder).
"""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tests import scriptrun
from tests.test_sources import assert_same_batches, encode, write_records
from utils.data import datasets, decoding, sampling, sources, splits, tfds_data
from utils.errors import UserError

CLASSES = ["zero", "one", "two"]
PER_CLASS = {"train": 10, "test": 3}
SUBSET = ["train_001.png", "train_004.png", "train_011.png", "train_017.png", "train_022.png", "train_027.png"]


def digit_examples(split):
  """(file name, image, label) of the first PER_CLASS[split] digits of classes 0, 1, 2, in array order."""
  train_images, train_labels, test_images, test_labels = datasets.load_digits()
  images, labels = (train_images, train_labels) if split == "train" else (test_images, test_labels)
  chosen = np.concatenate([np.flatnonzero(labels == label)[: PER_CLASS[split]] for label in range(3)])
  return [(f"{split}_{number:03d}.png", images[index], int(labels[index])) for number, index in enumerate(chosen)]


class PawsTfdsDigits(tfds.core.GeneratorBasedBuilder):
  """Digits 0, 1, 2 as an image-classification dataset of TFDS's usual features."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    features = {"image": tfds.features.Image(encoding_format="png"), "label": tfds.features.ClassLabel(names=CLASSES)}
    return tfds.core.DatasetInfo(
      builder=self, features=tfds.features.FeaturesDict({**features, "file_name": tfds.features.Text()})
    )

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in PER_CLASS}

  def _generate_examples(self, split):
    for name, image, label in digit_examples(split):
      yield name, {"image": image, "label": label, "file_name": name}


class PawsTfdsSubset(tfds.core.GeneratorBasedBuilder):
  """A labeled subset as imagenet2012_subset/10pct is one: a train split whose file_name values are the subset."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="six"), tfds.core.BuilderConfig(name="stale")]

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"file_name": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    names = SUBSET if self.builder_config.name == "six" else [*SUBSET[:2], "train_999.png"]
    for name in names:
      yield name, {"file_name": name}


class PawsTfdsNoImage(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    features = {
      "pixels": tfds.features.Tensor(shape=(2,), dtype=np.uint8),
      "label": tfds.features.ClassLabel(num_classes=2),
    }
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    yield 0, {"pixels": np.zeros(2, np.uint8), "label": 0}


# TFDS looks for a builder's checksums beside its module; for a module of a package (tests.test_tfds) that needs
# importlib_resources, which TFDS does not install. A one-part module name: no checksums, nothing to download.
for _builder in (PawsTfdsDigits, PawsTfdsSubset, PawsTfdsNoImage):
  _builder.__module__ = "test_tfds"


def prepare(builder_class, data_dir, **options):
  """Prepares a builder's dataset in data_dir, offline (nothing to download, no GCS lookup)."""
  builder = builder_class(data_dir=str(data_dir), **options)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tfds")
  prepare(PawsTfdsDigits, root)
  for config in ("six", "stale"):
    prepare(PawsTfdsSubset, root, config=config)
  prepare(PawsTfdsNoImage, root)
  return str(root)


def tfds_config(**data):
  config = scriptrun.config_with("--config.data.labeled_per_class=2")
  with config.unlocked():
    config.data.update({"dataset": "tfds", "tfds_name": "paws_tfds_digits", **data})
    config.pretrain.update(batch_size=6, classes_per_batch=3, images_per_class=2, multicrop=2)
  return config


def decoded(images):
  indices = [tf.constant(index, tf.int64) for index in range(len(images))]
  return [decoding.decode_image(images.read(index), images.describe(index)).numpy() for index in indices]


def test_records_by_index_are_what_tfds_load_gives(data_dir):
  source = sources.open_source(tfds_config().data, data_dir, evaluation=True)
  assert source.class_names == CLASSES
  for split, images in (("train", source.train), ("test", source.evaluation)):
    loaded = list(tfds.load("paws_tfds_digits", split=split, data_dir=data_dir, shuffle_files=False, download=False))
    assert len(images) == len(loaded) == 3 * PER_CLASS[split]
    for pixels, example in zip(decoded(images), loaded, strict=True):
      np.testing.assert_array_equal(pixels, example["image"].numpy())
    np.testing.assert_array_equal(images.labels, [int(example["label"]) for example in loaded])
    assert list(images.names) == [example["file_name"].numpy().decode() for example in loaded]
  # TFDS shuffles records within a split: the index order is its file order, not the generator's
  assert sorted(source.train.names) == [name for name, _, _ in digit_examples("train")]
  assert list(source.train.names) != sorted(source.train.names)


def test_evaluation_split_is_validation_else_test():
  assert tfds_data.evaluation_split(["train", "test", "validation"]) == "validation"
  assert tfds_data.evaluation_split(["test", "train"]) == "test"
  assert tfds_data.evaluation_split(["train"]) is None


def test_streamed_batches_are_the_tfrecord_sources(data_dir, tmp_path):
  """The same images as Model Garden TFRecords, in the same order, give the same batches, bit for bit;
  a resumed stream is the uninterrupted one."""
  config = tfds_config()
  source = sources.open_source(config.data, data_dir)
  loaded = list(tfds.load("paws_tfds_digits", split="train", data_dir=data_dir, shuffle_files=False, download=False))
  write_records(str(tmp_path / "train"), [e["image"].numpy() for e in loaded], source.train_labels, shards=2)
  with config.unlocked():
    config.data.dataset = "tfrecord"
  records = sources.open_source(config.data, str(tmp_path))
  labeled = splits.select_labeled_indices(source.train_labels, 2, 7)
  plan = sampling.PawsPlan(labeled, source.train_labels, source.num_unlabeled, config.pretrain, 3, 1)
  steps = dict(start_step=0, total_steps=2)
  streamed = list(source.pretrain_dataset(plan, config.data, config.pretrain, **steps))
  assert_same_batches(
    list(records.pretrain_dataset(plan, config.data, config.pretrain, **steps)), streamed, 0.0, config.data
  )
  resumed = source.pretrain_dataset(plan, config.data, config.pretrain, start_step=1, total_steps=2)
  assert_same_batches(streamed[1:], list(resumed), 0.0, config.data)


def test_labeled_subset_by_file_name(data_dir, tmp_path):
  source = sources.open_source(tfds_config().data, data_dir)
  expected = np.sort([list(source.train.names).index(name) for name in SUBSET])
  indices = source.read_split_file("tfds:paws_tfds_subset/six")
  np.testing.assert_array_equal(indices, expected)
  np.testing.assert_array_equal(np.bincount(source.train_labels[indices]), [2, 2, 2])
  with pytest.raises(UserError, match=r"tfds:paws_tfds_subset/stale line \d: 'train_999.png' names no training image"):
    source.read_split_file("tfds:paws_tfds_subset/stale", check_balance=False)
  with pytest.raises(UserError, match="paws_tfds_subset/nosuch.*check data.tfds_name"):
    source.read_split_file("tfds:paws_tfds_subset/nosuch")
  with pytest.raises(UserError, match="has no 'file_name' feature"):
    source.read_split_file("tfds:paws_tfds_no_image")
  folder = tmp_path / "folder"
  for name, image, label in digit_examples("train"):
    path = folder / "train" / CLASSES[label] / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(image))
  with pytest.raises(UserError, match="needs data.dataset=tfds, not folder"):
    sources.open_source(tfds_config(dataset="folder").data, str(folder)).read_split_file("tfds:paws_tfds_subset/six")


def test_errors(data_dir, tmp_path):
  def fails(name, match, directory=data_dir):
    with pytest.raises(UserError, match=match):
      sources.open_source(tfds_config(tfds_name=name).data, directory)

  fails("paws_tfds_digits", r"is not prepared in .*tfds build paws_tfds_digits --data_dir=", str(tmp_path))
  fails("paws_tfds_digits:2.0.0", "paws_tfds_digits:2.0.0")
  fails("no_such_dataset_anywhere", "TFDS has no dataset of that name")
  fails("paws_tfds_no_image", "has no 'image' feature of type Image .*pixels: Tensor")
  prepare(PawsTfdsDigits, tmp_path / "array", file_format="array_record")
  fails("paws_tfds_digits", "prepared as array_record.*--file_format=tfrecord", str(tmp_path / "array"))


def test_paws_train_on_tfds_with_a_tfds_labeled_subset(data_dir, tmp_path):
  """The script finds both datasets from their files alone and labels the subset's images."""
  workdir = tmp_path / "run"
  flags = [
    *scriptrun.TINY,
    "--config.data.dataset=tfds",
    "--config.data.tfds_name=paws_tfds_digits",
    f"--data_dir={data_dir}",
    "--split_file=tfds:paws_tfds_subset/six",
    "--config.data.labeled_per_class=0",
    "--config.pretrain.batch_size=6",
    "--config.pretrain.classes_per_batch=3",
    "--config.pretrain.images_per_class=2",
    "--config.pretrain.epochs=1",
    "--config.pretrain.warmup_epochs=0",
  ]
  result = scriptrun.run("paws_train.py", *flags, f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "30 training records in 3 classes; evaluation split: test" in result.stdout + result.stderr
  assert sorted((workdir / "labeled_files.txt").read_text().split()) == sorted(SUBSET)
  empty, other = tmp_path / "empty", tmp_path / "other"
  empty.mkdir()
  other.mkdir()
  flags[flags.index(f"--data_dir={data_dir}")] = f"--data_dir={empty}"
  scriptrun.fails_cleanly("paws_train.py", *flags, error="tfds_not_prepared", workdir=str(other))
