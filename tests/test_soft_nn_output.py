"""Soft-NN evaluation embeds with the encoder's output z (METHOD.md section 7): the prediction head's output when
the model has one, as the reference's ImageNet evaluation (`snn_eval.py --use-pred`); the projection head's
output h, unchanged, without one (cifar10, digits)."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from tests import scriptrun
from utils import evaluation, losses
from utils.data import datasets, pipelines, splits
from utils.model import encoder as encoder_lib
from utils.workdir import Workdir

# A tiny digits model with a prediction head (WRN-10-1, 32-d heads, prediction bottleneck 8), 4 labels per class.
SETTINGS = [
  "--config=config.py:digits",
  "--config.data.labeled_per_class=4",
  "--config.model.hidden_dim=32",
  "--config.model.projection_dim=32",
  "--config.model.prediction_head=True",
  "--config.model.prediction_hidden_dim=8",
]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  """A workdir holding a freshly initialised encoder with a prediction head and a labeled subset, evaluated by
  nn_eval.py --export (the SavedModel stores the support embeddings nn_eval.py computed)."""
  root = tmp_path_factory.mktemp("soft_nn")
  workdir, export_dir = str(root / "workdir"), str(root / "model")
  config = scriptrun.config_with(*SETTINGS)
  assert config.model.prediction_head
  tf_keras.utils.set_random_seed(0)
  encoder = encoder_lib.build_encoder(config.model, config.data.image_size)
  encoder_lib.save_encoder(encoder, config, os.path.join(workdir, "encoder"), step=0, stage="pretrain")
  _, train_labels, _, _ = datasets.load_dataset("digits")
  labeled = np.sort(np.concatenate([np.flatnonzero(train_labels == label)[:4] for label in range(10)]))  # as read back
  run = Workdir(workdir)
  splits.write_split_files(run.labeled_indices_npy, run.labeled_indices, labeled)
  result = scriptrun.run(
    "nn_eval.py", *SETTINGS, f"--workdir={workdir}", f"--export={export_dir}", "--encoder=pretrained"
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return config, workdir, export_dir, labeled


def heads(encoder, images, config):
  """(h, z) of uint8 images, in nn_eval's batches and normalisation, float32 NumPy."""
  batches = pipelines.eval_dataset(images, config.eval.batch_size, config.data.mean, config.data.std)
  outputs = [encoder(batch, training=False) for batch in batches]
  return tuple(np.concatenate([output[i].numpy() for output in outputs]) for i in (0, 1))


def test_nn_eval_embeds_with_the_prediction_head(evaluated):
  config, workdir, export_dir, labeled = evaluated
  encoder = evaluation.load_float32_encoder(os.path.join(workdir, "encoder"), config, "paws_train.py")
  train_images, train_labels, test_images, test_labels = datasets.load_dataset("digits")
  h, z = heads(encoder, train_images[labeled], config)
  assert h.shape == z.shape == (40, 32)
  # The supports nn_eval.py embedded (stored in the export) are z, not h.
  model = tf.saved_model.load(export_dir)
  supports = model.support_embeddings.numpy()
  np.testing.assert_allclose(supports, z, rtol=1e-6, atol=1e-6)
  assert np.abs(supports - h).max() > 0.1, np.abs(supports - h).max()
  # So are the queries: the served embedding is the normalised z of each test image.
  queries_h, queries_z = heads(encoder, test_images, config)
  served = model.signatures["serving_default"](images=tf.constant(test_images))
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  np.testing.assert_allclose(served["embedding"].numpy(), unit(queries_z), atol=1e-5)
  assert np.abs(served["embedding"].numpy() - unit(queries_h)).max() > 0.1
  # And nn_eval.py's top-1 is the soft-NN top-1 of z.
  one_hot = tf.one_hot(train_labels[labeled], 10)
  predictions = losses.snn(tf.constant(queries_z), tf.constant(z), one_hot, config.eval.tau).numpy().argmax(axis=1)
  with open(os.path.join(workdir, "eval.json")) as file:
    assert json.load(file)["top1"] == pytest.approx(100.0 * np.mean(predictions == test_labels), abs=1e-9)


def test_without_a_prediction_head_the_embedding_is_the_projection_heads_output():
  config = scriptrun.config_with("--config=config.py:digits")
  assert not config.model.prediction_head
  tf_keras.utils.set_random_seed(0)
  encoder = encoder_lib.build_encoder(config.model, config.data.image_size)
  images = datasets.load_dataset("digits")[2][:20]
  h, z = heads(encoder, images, config)
  embedded = evaluation.embed(encoder, images, config.eval.batch_size, config.data.mean, config.data.std).numpy()
  np.testing.assert_array_equal(embedded, h)  # bit for bit
  np.testing.assert_array_equal(z, h)
