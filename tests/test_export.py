"""nn_eval.py --export: a SavedModel that reloads without this repository and predicts as nn_eval.py does."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from tests import scriptrun
from utils import evaluation, export
from utils.data import augment, datasets, sources, splits
from utils.errors import UserError
from utils.model import encoder as encoder_lib
from utils.workdir import Workdir

# One pre-training epoch (10 steps) of the tiny digits model: enough to separate the classes somewhat.
SETTINGS = [*scriptrun.TINY, "--config.pretrain.epochs=1", "--config.pretrain.warmup_epochs=0"]

# Runs in a fresh interpreter outside the repository: plain TensorFlow, none of this repository's code.
RELOAD = r"""
import importlib.util
import sys

import numpy as np
import tensorflow as tf


assert importlib.util.find_spec("utils") is None, "the repository is importable"
export_dir, inputs_path, outputs_path, batch_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = tf.saved_model.load(export_dir)
serve = model.signatures["serving_default"]
inputs = np.load(inputs_path)
outputs = {"class_names": model.class_names.numpy().astype(str)}
for name in inputs.files:
  images = inputs[name]
  parts = [serve(images=tf.constant(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
  for key in ("probabilities", "embedding"):
    outputs[f"{name}/{key}"] = np.concatenate([part[key].numpy() for part in parts])
np.savez(outputs_path, **outputs)
"""


def read_class_names(path):
  """The class names of class_names.txt, in label order (what a user of the SavedModel reads)."""
  with open(path, encoding="utf-8") as file:
    return file.read().splitlines()


def pil_square_resize(images, size):
  """Oracle: the centred square of uint8 [N, H, W, 3], cut in NumPy, resized by PIL's antialiased bilinear filter
  in float mode; [0, 1] floats [N, size, size, 3]."""
  height, width = images.shape[1:3]
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  squares = images[:, top : top + side, left : left + side].astype(np.float32)
  channels = [
    np.asarray(
      Image.fromarray(np.ascontiguousarray(square[..., channel]), mode="F").resize((size, size), Image.BILINEAR)
    )
    for square in squares
    for channel in range(3)
  ]
  return np.stack(channels).reshape(len(images), 3, size, size).transpose(0, 2, 3, 1) / 255.0


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A tiny pre-trained digits workdir, evaluated with --export; the reloaded model's outputs."""
  root = tmp_path_factory.mktemp("export")
  workdir, export_dir = str(root / "workdir"), str(root / "model")
  os.makedirs(workdir)
  pretrain = scriptrun.run("paws_train.py", *SETTINGS, f"--workdir={workdir}")
  assert pretrain.returncode == 0, pretrain.stderr[-3000:]
  evaluation_run = scriptrun.run("nn_eval.py", *SETTINGS, f"--workdir={workdir}", f"--export={export_dir}")
  assert evaluation_run.returncode == 0, evaluation_run.stderr[-3000:]
  assert export_dir in evaluation_run.stdout

  _, _, test_images, _ = datasets.load_dataset("digits")
  rng = np.random.default_rng(0)
  inputs = {
    "test": test_images,  # the evaluation's queries, at the encoder's input size (16)
    # Other sizes, square and not: upsampled test images and noise.
    "large": np.stack(
      [np.asarray(Image.fromarray(image).resize((32, 32), Image.BILINEAR)) for image in test_images[:8]]
    ),
    "oblong": rng.integers(0, 256, [3, 20, 29, 3], dtype=np.uint8),
  }
  inputs_path, outputs_path = str(root / "inputs.npz"), str(root / "outputs.npz")
  np.savez(inputs_path, **inputs)
  environment = scriptrun.environment()
  environment.pop("PYTHONPATH", None)
  batch_size = str(scriptrun.config_with(*SETTINGS).eval.batch_size)  # nn_eval's query batches
  reload = subprocess.run(
    [sys.executable, "-c", RELOAD, export_dir, inputs_path, outputs_path, batch_size],
    cwd=str(root),
    env=environment,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert reload.returncode == 0, reload.stderr[-3000:]
  with np.load(outputs_path) as outputs:
    return workdir, export_dir, inputs, dict(outputs)


@pytest.fixture(scope="module")
def reference(exported):
  """What utils.evaluation (nn_eval's code) computes from the same workdir: encoder, supports, test probabilities."""
  workdir = exported[0]
  config = scriptrun.config_with(*SETTINGS)
  _, directory, written_by = evaluation.encoder_directory(Workdir(workdir))
  encoder = evaluation.load_float32_encoder(directory, config, written_by)
  train_images, train_labels, test_images, test_labels = datasets.load_dataset("digits")
  labeled = splits.read_split_file(os.path.join(workdir, "labeled_indices.txt"), len(train_labels))
  data, batch_size = config.data, config.eval.batch_size
  support = evaluation.embed(encoder, train_images[labeled], batch_size, data.mean, data.std)

  def probabilities(images):  # uint8 at the input size, or float [0, 1]
    queries = evaluation.embed(encoder, images, batch_size, data.mean, data.std)
    return evaluation.soft_nn_predict(support, train_labels[labeled], queries, 10, config.eval.tau, batch_size), queries

  return probabilities, test_labels


def test_reloaded_model_predicts_as_nn_eval(exported, reference):
  workdir, _, inputs, outputs = exported
  probabilities_of, test_labels = reference
  expected, queries = probabilities_of(inputs["test"])
  probabilities = outputs["test/probabilities"]
  assert probabilities.shape == (len(test_labels), 10) and probabilities.dtype == np.float32
  np.testing.assert_allclose(probabilities, expected, atol=1e-5)
  predictions = probabilities.argmax(axis=1)
  np.testing.assert_array_equal(predictions, expected.argmax(axis=1))
  with open(os.path.join(workdir, "eval.json")) as f:
    top1 = json.load(f)["top1"]
  assert 100.0 * np.mean(predictions == test_labels) == pytest.approx(top1, abs=1e-9)
  assert len(np.unique(predictions)) >= 3  # the comparison means something only if the model does not answer one class
  # The embedding output: the L2-normalised projection-head output.
  embedding = outputs["test/embedding"]
  np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(embedding, queries / np.linalg.norm(queries, axis=1, keepdims=True), atol=1e-5)


def test_other_image_sizes_are_centre_cropped_and_resized_like_pil(exported, reference):
  _, _, inputs, outputs = exported
  probabilities_of, _ = reference
  for name in ("large", "oblong"):
    probabilities = outputs[f"{name}/probabilities"]
    assert probabilities.shape == (len(inputs[name]), 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    expected, _ = probabilities_of(pil_square_resize(inputs[name], 16))
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)  # measured: ~1e-7
    np.testing.assert_allclose(np.linalg.norm(outputs[f"{name}/embedding"], axis=1), 1.0, atol=1e-5)


def test_probabilities_and_class_names(exported):
  _, export_dir, _, outputs = exported
  probabilities = outputs["test/probabilities"]
  assert probabilities.min() >= 0.0
  np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
  names = read_class_names(os.path.join(export_dir, export.CLASS_NAMES_FILE))
  assert names == [str(digit) for digit in range(10)]
  assert list(outputs["class_names"]) == names


def test_export_directory_checks(tmp_path):
  export.check_export_directory(str(tmp_path / "new" / "nested"))  # created when saving
  export.check_export_directory(str(tmp_path))  # empty
  (tmp_path / export.SAVED_MODEL_FILE).write_bytes(b"")
  (tmp_path / "variables").mkdir()
  export.check_export_directory(str(tmp_path))  # a previous export: overwritten
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(UserError, match="is a file"):
    export.check_export_directory(str(tmp_path / "a_file"))
  (tmp_path / "workdir").mkdir()
  (tmp_path / "workdir" / "eval.json").write_text("{}")
  with pytest.raises(UserError, match="non-empty folder without a SavedModel"):
    export.check_export_directory(str(tmp_path / "workdir"))


def test_class_names(tmp_path):
  assert export.dataset_class_names("cifar10")[:2] == ("airplane", "automobile")
  assert len(export.dataset_class_names("cifar10")) == 10 and export.dataset_class_names("cifar10")[-1] == "truck"
  assert export.dataset_class_names("digits") == tuple("0123456789")
  assert export.dataset_class_names("some_folder") is None
  assert export.checked_class_names(None, 3) == ["0", "1", "2"]
  with pytest.raises(ValueError, match="2 class names for labels up to 2"):
    export.checked_class_names(["a", "b"], 3)
  with pytest.raises(ValueError, match="single line"):
    export.checked_class_names(["a", "b\nc"], 2)
  path = str(tmp_path / export.CLASS_NAMES_FILE)
  export.write_class_names(path, ["cat", "sea lion", "Übung"])
  assert read_class_names(path) == ["cat", "sea lion", "Übung"]


def test_preprocessing_at_the_input_size_is_the_evaluation_normalisation():
  config = scriptrun.config_with(*SETTINGS)
  encoder = encoder_lib.build_encoder(config.model, 16)
  model = export.SoftNNClassifier(encoder, np.ones([2, 32]), [0, 1], ["a", "b"], tau=0.1, data=config.data)
  assert model.preprocessing.numpy().decode() == export.CENTRE_SQUARE
  images = np.random.default_rng(1).integers(0, 256, [4, 16, 16, 3], dtype=np.uint8)
  # Bit for bit: resizing to the same size is the identity, so nn_eval's queries are unchanged.
  np.testing.assert_array_equal(
    model.preprocess(tf.constant(images)).numpy(), augment.normalize(images, config.data.mean, config.data.std).numpy()
  )
  for shape in ([2, 37, 23, 3], [2, 20, 29, 3], [1, 8, 8, 3]):  # tall, wide (odd margins), smaller
    other = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_allclose(
      model.preprocess(tf.constant(other)).numpy(),
      augment.normalize(pil_square_resize(other, 16), config.data.mean, config.data.std).numpy(),
      atol=1e-5,
    )


def test_preprocessing_of_image_files_is_resize_and_centre_crop():
  """Folder / tfrecord data (the ImageNet recipe): nn_eval.py prepares supports and queries by the reference's
  Resize(S * 256 / 224) + CenterCrop(S) (sources.EVALUATION_TRANSFORM); the exported model does the same, within
  a grey level of Pillow's Resize + crop (tests/test_imagenet_run.py compares its outputs with nn_eval's)."""
  config = scriptrun.config_with(*SETTINGS, "--config.data.dataset=folder")
  data = config.data
  encoder = encoder_lib.build_encoder(config.model, 16)
  model = export.SoftNNClassifier(encoder, np.ones([2, 32]), [0, 1], ["a", "b"], tau=0.1, data=data)
  assert model.preprocessing.numpy().decode() == export.RESIZE_CENTRE_CROP
  for shape in ([2, 37, 23, 3], [2, 20, 29, 3], [1, 16, 16, 3]):  # tall, wide, at the input size (not kept whole)
    images = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    prepared = model.preprocess(tf.constant(images)).numpy()
    for image, mine in zip(images, prepared, strict=True):
      expected = augment.normalize(sources.EVALUATION_TRANSFORM(tf.constant(image), 16), data.mean, data.std)
      np.testing.assert_array_equal(mine, expected.numpy())
      height, width = image.shape[:2]
      new_w, new_h = (18, 18 * height // width) if width <= height else (18 * width // height, 18)
      left, top = round((new_w - 16) / 2), round((new_h - 16) / 2)
      pil = Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR).crop((left, top, left + 16, top + 16))
      pil = augment.normalize(np.asarray(pil, np.float32)[None] / 255, data.mean, data.std).numpy()[0]
      assert np.abs(mine - pil).max() <= (1 / 255 + 1e-6) / min(data.std)
