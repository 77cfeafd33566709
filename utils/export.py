"""A trained encoder and its labeled supports as a self-contained TensorFlow SavedModel (METHOD.md section 7).

The exported model classifies raw images the way nn_eval.py does: it brings them to the encoder's input size as
nn_eval.py prepares the dataset's images (image files, the ImageNet recipe: the reference's Resize + CenterCrop;
in-memory datasets: the centred square resized, the images themselves at the input size), normalises them,
embeds them with the encoder in inference mode (BatchNorm moving statistics) in float32 (the encoder's output z:
the prediction head's when it has one, else the projection head's) and returns the soft-nearest-neighbour
class probabilities over the labeled supports, whose embeddings and one-hot labels are stored in the model.
Loading it needs TensorFlow only:

  model = tf.saved_model.load(directory)
  outputs = model.signatures["serving_default"](images=uint8_batch)  # [batch, height, width, 3], any size
  outputs["probabilities"]  # [batch, classes] float32, rows sum to 1
  outputs["embedding"]      # [batch, projection_dim] float32, the L2-normalised embedding nn_eval.py uses

The class names, in label order, are in `class_names.txt` next to the model (one per line) and in the model's
`class_names` variable; its `preprocessing` variable names how it brings images to the input size
("resize_centre_crop" or "centre_square").
"""

import os

from ml_collections import ConfigDict
import numpy as np
import tensorflow as tf
import tf_keras

from utils import evaluation, losses
from utils.data import augment, decoding, sources
from utils.errors import UserError

SIGNATURE_NAME = "serving_default"


INPUT_NAME = "images"


PROBABILITIES_NAME = "probabilities"


EMBEDDING_NAME = "embedding"


CLASS_NAMES_FILE = "class_names.txt"


# The model's `preprocessing` variable: how it brings images to the input size (SoftNNClassifier.preprocess).
CENTRE_SQUARE = "centre_square"


RESIZE_CENTRE_CROP = "resize_centre_crop"


SAVED_MODEL_FILE = "saved_model.pb"


# Label order of the official CIFAR-10 batches (batches.meta's label_names).
CIFAR10_CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


DATASET_CLASS_NAMES = {"cifar10": CIFAR10_CLASS_NAMES, "digits": tuple(str(digit) for digit in range(10))}


def dataset_class_names(dataset: str) -> tuple[str, ...] | None:
  """Class names of a built-in dataset in label order, or None for a dataset without known names."""
  return DATASET_CLASS_NAMES.get(dataset)


class SoftNNClassifier(tf.Module):
  """Raw uint8 images -> soft-NN class probabilities over stored supports, and embeddings.

  Only the encoder's variables are tracked, not the Keras model itself: the SavedModel then holds one traced
  function and plain variables, and `tf.saved_model.load` rebuilds it without this repository or Keras.

  Args:
    encoder: a float32 Encoder (utils/model/encoder.py); called with training=False.
    support_embeddings: evaluation.embed's embeddings of the labeled images [S, D] (normalised in the soft-NN).
    support_labels: int labels [S], in [0, len(class_names)).
    class_names: one name per class, in label order.
    tau: soft-NN temperature (eval.tau).
    data: the config's `data` section: image_size (the encoder's input side), mean and std (normalisation),
      dataset (image files, sources.STREAMED, are prepared by Resize + CenterCrop as nn_eval.py prepares them).
  """

  def __init__(self, encoder, support_embeddings, support_labels, class_names, *, tau, data):
    super().__init__(name="soft_nn_classifier")
    support_labels = np.asarray(support_labels, dtype=np.int64)
    self._encoder_call = lambda images: encoder(images, training=False)  # a closure: not tracked as a Keras model
    self.encoder_variables = list(encoder.variables)
    self.support_embeddings = tf.Variable(
      tf.cast(support_embeddings, tf.float32), trainable=False, name="support_embeddings"
    )
    self.support_labels = tf.Variable(
      tf.one_hot(support_labels, len(class_names), dtype=tf.float32), trainable=False, name="support_labels"
    )
    self.class_names = tf.Variable(list(class_names), dtype=tf.string, trainable=False, name="class_names")
    self.tau = tf.Variable(float(tau), dtype=tf.float32, trainable=False, name="tau")
    self.image_size = tf.Variable(int(data.image_size), dtype=tf.int32, trainable=False, name="image_size")
    self._size = int(data.image_size)
    self._mean = tuple(float(value) for value in data.mean)
    self._std = tuple(float(value) for value in data.std)
    self._files = data.dataset in sources.STREAMED
    self.preprocessing = tf.Variable(
      RESIZE_CENTRE_CROP if self._files else CENTRE_SQUARE, dtype=tf.string, trainable=False, name="preprocessing"
    )

  def preprocess(self, images):
    """uint8 [B, H, W, 3] -> normalised float32 [B, image_size, image_size, 3], as nn_eval.py prepares the images.

    Image files (folder, tfrecord: the ImageNet recipe): Resize(S * 256 / 224) + CenterCrop(S), the reference's
    evaluation transform (sources.EVALUATION_TRANSFORM, S = image_size), as nn_eval.py's supports and queries.
    In-memory datasets (cifar10, digits), evaluated whole: an image already at the encoder's size is returned
    unchanged, so the test images reach the encoder exactly as in nn_eval.py; another size has its centred
    square (the largest one) resized to it, bilinear with antialiasing (PIL's filter). Scaling to [0, 1]
    before the linear resize equals scaling after.
    """
    if self._files:
      return augment.normalize(sources.EVALUATION_TRANSFORM(images, self._size), self._mean, self._std)
    top, left, side, _ = tf.unstack(decoding.centre_box(tf.shape(images)[1], tf.shape(images)[2]))
    square = images[:, top : top + side, left : left + side]
    unit = tf.cast(square, tf.float32) * (1.0 / 255.0)
    resized = tf.image.resize(unit, [self._size, self._size], method="bilinear", antialias=True)
    return augment.normalize(resized, self._mean, self._std)

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name=INPUT_NAME)])
  def serve(self, images):
    """The serving signature: {'probabilities': [B, K], 'embedding': [B, D]}, both float32."""
    # z, as evaluation.embed: the prediction head's output, or the projection head's without one.
    embedding = tf.cast(self._encoder_call(self.preprocess(images))[1], tf.float32)
    probabilities = losses.snn(embedding, self.support_embeddings, self.support_labels, self.tau)
    return {PROBABILITIES_NAME: probabilities, EMBEDDING_NAME: tf.math.l2_normalize(embedding, axis=-1)}


def check_export_directory(directory: str) -> None:
  """Fails early (before a long evaluation) if `directory` cannot receive a SavedModel.

  Accepted: a path that does not exist yet (under a writable folder, when local), an empty folder, or a previous
  export (overwritten). A non-empty folder without a SavedModel (a workdir, say) is refused rather than mixed into.
  Any path tf.io.gfile knows works (gs://... too).
  """
  if tf.io.gfile.exists(directory):
    if not tf.io.gfile.isdir(directory):
      raise UserError(f"--export={directory} is a file; give a new or empty folder for the SavedModel")
    if tf.io.gfile.listdir(directory) and not tf.io.gfile.exists(os.path.join(directory, SAVED_MODEL_FILE)):
      raise UserError(
        f"--export={directory} is a non-empty folder without a SavedModel; give a new or empty folder "
        "(a previous export there is overwritten)"
      )
  if "://" in directory:
    return  # remote file systems: permissions show only when writing
  existing = os.path.abspath(directory)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
    raise UserError(f"--export={directory}: {existing} is not a writable folder; choose another place")


def checked_class_names(class_names, num_classes):
  """Names as a list of str for labels 0..num_classes - 1 (None: the labels themselves, "0", "1", ...)."""
  if class_names is None:
    return [str(label) for label in range(num_classes)]
  class_names = [str(name) for name in class_names]
  if len(class_names) < num_classes:
    raise ValueError(f"{len(class_names)} class names for labels up to {num_classes - 1}")
  for name in class_names:
    if not name or "\n" in name or "\r" in name:
      raise ValueError(f"class name {name!r} must be a non-empty single line (class_names.txt has one per line)")
  return class_names


def write_class_names(path, class_names):
  """Writes one class name per line, in label order."""
  with tf.io.gfile.GFile(path, "w") as file:
    file.write("".join(f"{name}\n" for name in class_names))


def export_model(
  directory: str,
  encoder: tf_keras.Model,
  data: ConfigDict,
  eval_config: ConfigDict,
  support_images,
  support_labels: np.ndarray,
  class_names=None,
) -> "SoftNNClassifier":
  """Embeds the supports and saves the soft-NN classifier as a SavedModel plus class_names.txt.

  Args:
    directory: output folder (created; a previous export there is overwritten).
    encoder: the float32 encoder nn_eval.py evaluated (evaluation.load_float32_encoder).
    data: the config's `data` section (dataset, image_size, mean, std).
    eval_config: the config's `eval` section (tau; batch_size for embedding the supports).
    support_images: uint8 [S, image_size, image_size, 3] labeled images, un-augmented, or nn_eval.py's
      batches of them (sources.Source.evaluation_sets).
    support_labels: int labels [S].
    class_names: names in label order (e.g. dataset_class_names); None = str(label) for labels
      0..max(support_labels).
  Returns:
    The SoftNNClassifier that was saved.
  """
  support_labels = np.asarray(support_labels, dtype=np.int64)
  class_names = checked_class_names(class_names, int(support_labels.max()) + 1)
  # The same embedding code and batches as evaluation.evaluate, so the stored supports are nn_eval's.
  support_embeddings = evaluation.embed(encoder, support_images, eval_config.batch_size, data.mean, data.std)
  model = SoftNNClassifier(encoder, support_embeddings, support_labels, class_names, tau=eval_config.tau, data=data)
  check_export_directory(directory)
  try:
    tf.io.gfile.makedirs(directory)
    tf.saved_model.save(model, directory, signatures={SIGNATURE_NAME: model.serve})
  except (OSError, tf.errors.OpError) as error:
    raise UserError(f"cannot write the SavedModel to {directory} ({str(error).splitlines()[0][:120]})") from None
  write_class_names(os.path.join(directory, CLASS_NAMES_FILE), class_names)
  return model
