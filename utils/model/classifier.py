"""Fine-tuning a linear classifier on the pre-trained network, as the reference does on ImageNet (METHOD.md section 10).

`finetune.mode = "classifier"` (the imagenet preset) replaces SuNCEt fine-tuning by the reference's
ImageNet fine-tuning: the trunk and the projection head's first block (Dense, BN, ReLU) keep their
pre-trained weights, a zero-initialised Dense maps them to the classes, and the whole network is trained
with cross-entropy on the labeled subset (RandomResizedCrop + flip), SGD with Nesterov momentum, a
cosine learning rate and BatchNorm on batch statistics (the reference trains in train mode). Evaluation
is Resize(256) + CenterCrop(224) and reports top-1 and top-5.

This module holds the model and its files; its optimizer and step are in utils/train/ (optim.build_sgd,
steps.classifier_steps), its input in utils/data/pipelines.py, its top-1/top-5 in utils/evaluation.py.
"""

from ml_collections import ConfigDict
import tensorflow as tf
import tf_keras

from utils.errors import UserError
from utils.model import encoder as encoder_lib
from utils.model import saved

# The first block of the projection head (encoder.mlp_head's names) kept by the classifier.
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


def from_encoder(encoder: encoder_lib.Encoder, num_classes: int, image_size: int) -> Classifier:
  """A Classifier sharing the encoder's trunk and first projection block (same layer objects, same weights)."""
  dense, bn = (encoder.projection.get_layer(name) for name in KEPT_BLOCK)
  model = Classifier(encoder.trunk, dense, bn, num_classes, name="classifier_model")
  model(tf.zeros([2, image_size, image_size, 3]), training=False)
  return model


def build(config: ConfigDict, num_classes: int, encoder_directory: str | None = None) -> Classifier:
  """The Classifier of the config's model: from the encoder saved in `encoder_directory`, else random."""
  if encoder_directory is None:
    encoder = encoder_lib.build_encoder(config.model, config.data.image_size)
  else:
    encoder, _ = encoder_lib.load_encoder(encoder_directory, config, "paws_train.py")
  return from_encoder(encoder, num_classes, config.data.image_size)


def save(model: Classifier, config: ConfigDict, directory: str, step: int, **selection) -> str:
  """Writes the classifier's weights and what load() checks next to them (e.g. WORKDIR/finetuned).

  selection: what chose this epoch, kept in classifier.json (fine_tune.py --heldout_split_file: selected_epoch,
  heldout_top1, heldout_images).
  """
  meta = saved.model_meta(config, num_classes=model.num_classes, finetune_step=step, **selection)
  return saved.save(model, saved.CLASSIFIER, directory, meta)


def read_meta(directory: str) -> dict | None:
  """classifier.json of a saved classifier, or None when there is none."""
  return saved.read_meta(directory, saved.CLASSIFIER, "") if exists(directory) else None


def exists(directory: str) -> bool:
  return saved.exists(directory, saved.CLASSIFIER)


def load(directory: str, config: ConfigDict) -> tuple[Classifier, dict]:
  """Rebuilds the classifier save() wrote, in float32 (saved.float32_policy), for evaluation; one-line errors
  when missing, from another model config or unreadable."""
  missing = "no fine-tuned classifier there; run fine_tune.py first with this --workdir"
  meta = saved.read_meta(directory, saved.CLASSIFIER, missing)
  changed = saved.changed_fields(meta, config, check_image_size=True)
  if changed:
    raise UserError(
      f"the classifier in {directory} was trained with another config ({', '.join(changed)} differ); "
      "use the same --config as for fine_tune.py"
    )
  with saved.float32_policy():
    model = build(config, meta["num_classes"])
  saved.read_weights(model, saved.CLASSIFIER, directory, "re-run fine_tune.py")
  return model, meta
