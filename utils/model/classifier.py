"""Fine-tuning a linear classifier on the pre-trained network, as the reference does on ImageNet (METHOD.md section 10).

`finetune.mode = "classifier"` (the imagenet preset) replaces SuNCEt fine-tuning by the reference's
ImageNet fine-tuning: the trunk and the projection head's first block (Dense, BN, ReLU) keep their
pre-trained weights, a zero-initialised Dense maps them to the classes, and the whole network is trained
with cross-entropy on the labeled subset (RandomResizedCrop + flip), SGD with Nesterov momentum, a
cosine learning rate and BatchNorm on batch statistics (the reference trains in train mode). Evaluation
is Resize(256) + CenterCrop(224) and reports top-1 and top-5.

The step follows utils/steps.py: built by steps.compile_steps, each replica gets its own rows of the
global batch from the input pipeline (`classifier_dataset(..., replica=(index, count))`).
"""

import os

import tensorflow as tf
import tf_keras

from utils import fileio
from utils.errors import UserError
from utils.model import encoder as encoder_lib

META_FILE = "classifier.json"


WEIGHTS = "classifier_weights"


# The first block of the projection head (utils/encoder.py mlp_head's names) kept by the classifier.
KEPT_BLOCK = ("dense1", "bn1")


class Classifier(tf_keras.Model):
  """trunk -> Dense -> BN -> ReLU (the projection head's first block) -> Dense(num_classes), logits in float32.

  The trunk follows the global precision policy; the block and the classifier are float32 like the heads.
  The classifier's weights and bias start at zero (the reference's zero_init): every class starts with
  probability 1 / num_classes and the first updates only move the classifier.
  """

  def __init__(self, trunk, dense, bn, num_classes, **kwargs):
    super().__init__(**kwargs)
    self.trunk = trunk
    self.dense1 = dense
    self.bn1 = bn
    self.head = tf_keras.layers.Dense(
      num_classes, kernel_initializer="zeros", bias_initializer="zeros", dtype="float32", name="classifier"
    )
    self.num_classes = num_classes

  def call(self, images, training=None):
    features = self.trunk(images, training=training)
    hidden = tf.nn.relu(self.bn1(self.dense1(features), training=training))
    return self.head(hidden)


def from_encoder(encoder, num_classes, image_size):
  """A Classifier sharing the encoder's trunk and first projection block (same layer objects, same weights)."""
  dense, bn = (encoder.projection.get_layer(name) for name in KEPT_BLOCK)
  model = Classifier(encoder.trunk, dense, bn, num_classes, name="classifier_model")
  model(tf.zeros([2, image_size, image_size, 3]), training=False)
  return model


def build(config, num_classes, encoder_directory=None):
  """The Classifier of the config's model: from the encoder saved in `encoder_directory`, else random."""
  if encoder_directory is None:
    encoder = encoder_lib.build_encoder(config.model, config.data.image_size)
  else:
    encoder, _ = encoder_lib.load_encoder(encoder_directory, config, "paws_train.py")
  return from_encoder(encoder, num_classes, config.data.image_size)


def save(model, config, directory, step):
  """Writes the classifier's weights and what load() checks next to them (e.g. WORKDIR/finetuned)."""
  tf.io.gfile.makedirs(directory)
  tf.train.Checkpoint(classifier=model).write(os.path.join(directory, WEIGHTS))
  fileio.write_json(
    os.path.join(directory, META_FILE),
    {
      "model": fileio.config_to_dict(config)["model"],
      "image_size": config.data.image_size,
      "num_classes": model.num_classes,
      "config_name": config.name,
      "finetune_step": step,
    },
  )
  return directory


def exists(directory):
  return tf.io.gfile.exists(os.path.join(directory, META_FILE))


def load(directory, config):
  """Rebuilds the classifier save() wrote, in float32, for evaluation; one-line errors when missing, from another
  model config or unreadable.

  Float32 whatever precision trained it, as the reference evaluates outside its fp16 autocast; the weights
  are float32 variables under every policy. The global policy is set back to what it was.
  """
  meta = fileio.read_json(
    os.path.join(directory, META_FILE), "no fine-tuned classifier there; run fine_tune.py first with this --workdir"
  )
  wanted = fileio.config_to_dict(config)["model"]
  if meta["model"] != wanted or meta["image_size"] != config.data.image_size:
    changed = sorted(f"model.{k}" for k in wanted if meta["model"].get(k) != wanted[k])
    if meta["image_size"] != config.data.image_size:
      changed.append("data.image_size")
    raise UserError(
      f"the classifier in {directory} was trained with another config ({', '.join(changed)} differ); "
      "use the same --config as for fine_tune.py"
    )
  policy = tf_keras.mixed_precision.global_policy()
  tf_keras.mixed_precision.set_global_policy("float32")
  try:
    model = build(config, meta["num_classes"])
  finally:
    tf_keras.mixed_precision.set_global_policy(policy)
  try:
    tf.train.Checkpoint(classifier=model).read(os.path.join(directory, WEIGHTS)).assert_existing_objects_matched()
  except (tf.errors.OpError, AssertionError) as error:
    raise UserError(
      f"cannot read the classifier weights in {directory} ({str(error).splitlines()[0][:120]}); re-run fine_tune.py"
    ) from None
  return model, meta
