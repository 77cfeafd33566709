"""A trained model on disk: its weights (a tf.train.Checkpoint) beside a JSON file of what rebuilding it needs.

The encoder (WORKDIR/encoder, WORKDIR/finetuned) and the classifier (WORKDIR/finetuned) are saved and
loaded the same way: the model config and image size they were trained with are written next to the
weights, and loading under another config is a one-line error, not a shape mismatch deep in TensorFlow.
"""

import contextlib
import dataclasses
import os

from ml_collections import ConfigDict
import tensorflow as tf
import tf_keras

from utils import fileio
from utils.errors import UserError


@dataclasses.dataclass(frozen=True)
class Kind:
  """How one kind of model is stored: its name in the checkpoint and messages, and its two file names."""

  name: str  # "encoder" or "classifier"
  meta_file: str
  weights: str


ENCODER = Kind("encoder", "encoder.json", "weights")
CLASSIFIER = Kind("classifier", "classifier.json", "classifier_weights")


def exists(directory: str, kind: Kind) -> bool:
  return tf.io.gfile.exists(os.path.join(directory, kind.meta_file))


def save(model: tf_keras.Model, kind: Kind, directory: str, meta: dict) -> str:
  """Writes the weights and `meta` (JSON, atomically) into `directory` (any tf.io.gfile path); returns it."""
  tf.io.gfile.makedirs(directory)
  tf.train.Checkpoint(**{kind.name: model}).write(os.path.join(directory, kind.weights))
  fileio.write_json(os.path.join(directory, kind.meta_file), meta)
  return directory


def model_meta(config: ConfigDict, **more) -> dict:
  """The meta data every saved model carries: the model config, image size and preset name, plus `more`."""
  return {
    "model": fileio.config_to_dict(config)["model"],
    "image_size": config.data.image_size,
    "config_name": config.name,
    **more,
  }


def read_meta(directory: str, kind: Kind, missing: str) -> dict:
  """The meta data saved beside the weights; `missing` says what to do when there is none."""
  return fileio.read_json(os.path.join(directory, kind.meta_file), missing)


def changed_fields(meta: dict, config: ConfigDict, check_image_size: bool) -> list[str]:
  """The config fields (model.*, data.image_size) whose values differ from those the model was saved with."""
  wanted = fileio.config_to_dict(config)["model"]
  changed = sorted(f"model.{key}" for key in wanted if meta["model"].get(key) != wanted[key])
  if meta["model"] != wanted and not changed:  # a field the saved config has and this one lacks
    changed = sorted(f"model.{key}" for key in meta["model"] if key not in wanted)
  if check_image_size and meta["image_size"] != config.data.image_size:
    changed.append("data.image_size")
  return changed


def read_weights(model: tf_keras.Model, kind: Kind, directory: str, remedy: str) -> None:
  """Restores the saved weights into the built `model`; a missing or unreadable file is a one-line error."""
  try:
    tf.train.Checkpoint(**{kind.name: model}).read(
      os.path.join(directory, kind.weights)
    ).assert_existing_objects_matched()
  except (tf.errors.OpError, AssertionError) as error:
    raise UserError(
      f"cannot read the {kind.name} weights in {directory} ({str(error).splitlines()[0][:120]}); {remedy}"
    ) from None


@contextlib.contextmanager
def float32_policy():
  """Builds models in float32 inside the block, whatever the global policy; the policy is set back after.

  The reference evaluates in fp32, outside its fp16 autocast: a soft-NN at tau = 0.1 magnifies the rounding
  of 16-bit embeddings. The weights are float32 variables under every policy, so they load unchanged.
  """
  policy = tf_keras.mixed_precision.global_policy()
  tf_keras.mixed_precision.set_global_policy("float32")
  try:
    yield
  finally:
    tf_keras.mixed_precision.set_global_policy(policy)
