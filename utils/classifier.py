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
import re

import ml_collections
import numpy as np
import tensorflow as tf
import tf_keras

from utils import augment, optim, pipeline, runtime, steps, training
from utils import encoder as encoder_lib
from utils.errors import UserError

# RandomResizedCrop scale of the reference's ImageNet fine-tuning (torchvision's default); flip on, no colour.
CROP_SCALE = (0.08, 1.0)
# Evaluation: Resize(shorter side to 256) + CenterCrop(224); other image sizes keep the ratio 256 / 224.
RESIZE_RATIO = 256 / 224
META_FILE = "classifier.json"
WEIGHTS = "classifier_weights"
METRICS = ("loss", "accuracy")
# The first block of the projection head (utils/encoder.py mlp_head's names) kept by the classifier.
KEPT_BLOCK = ("dense1", "bn1")


# --- Model ------------------------------------------------------------------------------------------------


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
  runtime.write_json(
    os.path.join(directory, META_FILE),
    {
      "model": runtime.config_to_dict(config)["model"],
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
  meta = runtime.read_json(
    os.path.join(directory, META_FILE), "no fine-tuned classifier there; run fine_tune.py first with this --workdir"
  )
  wanted = runtime.config_to_dict(config)["model"]
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


# --- Optimizer and step ---------------------------------------------------------------------------------


def build_sgd(learning_rate, momentum, precision="float32"):
  """SGD with Nesterov momentum (tf_keras legacy, as LARS), loss-scaled under mixed_float16.

  tf_keras: v <- momentum v - lr g; w <- w + momentum v - lr g. PyTorch keeps v <- momentum v + g and
  steps w <- w - lr (g + momentum v): the same update while lr is constant, and the first step is the
  same whatever the rate; under the cosine the two differ by the change of lr between steps.
  """
  optimizer = tf_keras.optimizers.legacy.SGD(learning_rate=learning_rate, momentum=momentum, nesterov=True)
  if precision == "mixed_float16":
    optimizer = tf_keras.mixed_precision.LossScaleOptimizer(optimizer)
  return optimizer


def create_train_state(strategy, make_model, learning_rate, finetune, precision):
  """training.TrainState holding the classifier (as its `encoder`), its SGD optimizer and the step counter."""
  with strategy.scope():
    model = make_model()
    optimizer = build_sgd(learning_rate, finetune.momentum, precision)
    # Slots before a restore and before tracing, as training.create_train_state does for LARS.
    optimizer._create_all_weights(model.trainable_variables)  # pylint: disable=protected-access
    step = tf.Variable(0, dtype=tf.int64, name="step")
  return training.TrainState(model, optimizer, step)


def decayed_variables(model):
  """The variables weight decay applies to: not biases, not BatchNorm scale/offset (as the reference's groups)."""
  return [v for v in model.trainable_variables if not any(re.search(p, v.name) for p in optim.LARS_EXCLUDE)]


def classifier_steps(config, strategy, model, optimizer, jit_compile):
  """The compiled cross-entropy update; step_fn gets this replica's (images [B, S, S, 3], labels [B]).

  The replica's loss is the mean over its rows; divided by the number of replicas, the summed gradients
  are those of the mean over the global batch. finetune.weight_decay (0 in the reference) is PyTorch's
  coupled decay: wd * w added to the gradients of the decayed variables.
  """
  f = config.finetune
  num_replicas = strategy.num_replicas_in_sync
  decayed = decayed_variables(model)

  def step_fn(images, labels):
    labels = tf.cast(labels, tf.int32)
    with tf.GradientTape() as tape:
      logits = tf.cast(model(images, training=True), tf.float32)
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
      objective = loss
      if f.weight_decay:
        objective += 0.5 * f.weight_decay * tf.add_n([tf.reduce_sum(tf.square(v)) for v in decayed])
      replica_share = objective / num_replicas  # summed over replicas by apply_gradients
    optimizer.minimize(replica_share, model.trainable_variables, tape=tape)
    accuracy = tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), labels), tf.float32))
    return {"loss": loss, "accuracy": accuracy}

  return steps.compile_steps(strategy, step_fn, METRICS, jit_compile)


# --- Training input ----------------------------------------------------------------------------------------

# A trailing word of its own keeps these permutations apart from pipeline.unlabeled_indices' for the same seed.
_STREAM = 3


def batch_positions(num_labeled, batch_size, step, seed):
  """Positions in the labeled subset of the global batch at `step`: a new permutation per epoch, no partial batch."""
  epoch, position = divmod(step, num_labeled // batch_size)
  order = np.random.default_rng([seed, epoch, _STREAM]).permutation(num_labeled)
  return order[position * batch_size : (position + 1) * batch_size]


def steps_per_epoch(num_labeled, batch_size):
  if batch_size > num_labeled:
    raise UserError(
      f"finetune.batch_size={batch_size} is larger than the {num_labeled} labeled images; lower finetune.batch_size"
    )
  return num_labeled // batch_size


def crop_and_flip(data):
  """The config's data section reduced to what fine-tuning augments: flip, mean, std; no colour operation."""
  return ml_collections.ConfigDict(
    {
      "flip": data.flip,
      "color_jitter_prob": 0.0,
      "color_jitter_strength": 0.0,
      "solarize_prob": 0.0,
      "equalize_prob": 0.0,
      "grayscale_prob": 0.0,
      "blur_prob": 0.0,
      "mean": tuple(data.mean),
      "std": tuple(data.std),
    }
  )


def _view_seed(seed, step):
  """The step's seed of pipeline.streamed_views' first view (seed * 1000 + 1, step, split once)."""
  pair = tf.stack([tf.cast(seed, tf.int64) * 1000 + 1, tf.cast(step, tf.int64)])
  return tf.random.experimental.stateless_split(pair, 1)[0]


def classifier_dataset(
  images, labeled_indices, labels, data, batch_size, *, start_step, total_steps, seed, replica=(0, 1)
):
  """(images, labels) batches of the labeled subset: RandomResizedCrop(image_size, scale 0.08-1) + flip.

  Args:
    images: uint8 [N, H, W, 3] training images, or a sources.ImageFiles of them (streamed from files).
    labeled_indices: int [L], the labeled subset (indices into images).
    labels: int [L], their labels.
    data: the config's `data` section (image_size, flip, mean, std).
    batch_size: images per step, all replicas (finetune.batch_size).
    start_step, total_steps: the stream covers steps [start_step, total_steps); each step's images and
      random draws depend on (seed, step) only.
    seed: sampling and augmentation seed.
    replica: (index, count): the stream holds rows index * B / count .. (index + 1) * B / count of every
      global batch, augmented with the global batch's draws.
  Returns:
    Dataset of (float32 [batch_size / count, S, S, 3] normalised, int64 [batch_size / count]).
  """
  index, count = replica
  if batch_size % count:
    raise UserError(f"finetune.batch_size={batch_size} must divide by the {count} replicas")
  local = batch_size // count
  rows = slice(index * local, (index + 1) * local)
  labeled_indices = np.asarray(labeled_indices, np.int64)
  labels = np.asarray(labels, np.int64)
  size = data.image_size
  plain = crop_and_flip(data)

  def index_stream():
    for step in range(start_step, total_steps):
      yield step, labeled_indices[batch_positions(len(labeled_indices), batch_size, step, seed)]

  def label_stream():
    for step in range(start_step, total_steps):
      yield labels[batch_positions(len(labeled_indices), batch_size, step, seed)][rows]

  signature = (tf.TensorSpec([], tf.int64), tf.TensorSpec([batch_size], tf.int64))
  if isinstance(images, np.ndarray):
    images = tf.constant(images)

    def make_batch(step, indices):
      return augment.augment_batch(
        tf.gather(images, indices[rows]),
        _view_seed(seed, step),
        size,
        CROP_SCALE,
        flip=plain.flip,
        color_jitter_prob=0.0,
        solarize_prob=0.0,
        equalize_prob=0.0,
        mean=plain.mean,
        std=plain.std,
        rows=(rows.start, batch_size),  # this replica's rows, with the global batch's draws
      )

    views = tf.data.Dataset.from_generator(index_stream, output_signature=signature)
    views = views.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:
    groups = [(0, 1, size, CROP_SCALE)]  # one view per step; only this replica's images are read
    views = pipeline.streamed_views(images, index_stream, batch_size, groups, seed, plain, rows=(rows.start, local))
    views = views.map(lambda view: view)  # (view,) -> view
  targets = tf.data.Dataset.from_generator(label_stream, output_signature=tf.TensorSpec([local], tf.int64))
  return tf.data.Dataset.zip(views, targets).prefetch(tf.data.AUTOTUNE)


def source_dataset(source, labeled, config, *, start_step, total_steps, seed, replica=(0, 1)):
  """classifier_dataset of a utils/sources.py Source's labeled subset (arrays or files)."""
  images = source.train if source.streamed else source.train_images
  labeled = np.asarray(labeled, np.int64)
  batch_size = config.finetune.batch_size
  source.watch_steps(images, lambda step: labeled[batch_positions(len(labeled), batch_size, step, seed)])
  return classifier_dataset(
    images,
    labeled,
    source.train_labels[labeled],
    config.data,
    batch_size,
    start_step=start_step,
    total_steps=total_steps,
    seed=seed,
    replica=replica,
  )


def replicas_dataset(source, labeled, config, replicas, *, start_step, total_steps, seed):
  """source_dataset for the replicas one input pipeline feeds, for strategy.distribute_datasets_from_function.

  `replicas` has `ids` (the pipeline's replica ids, in the order it feeds them) and `total` (replicas in
  sync). The pipeline emits step 0 of each of its replicas in turn, then step 1, ...: tf.distribute gives
  a worker's devices consecutive elements of its dataset.
  """
  return pipeline.round_robin(
    lambda index: source_dataset(
      source,
      labeled,
      config,
      start_step=start_step,
      total_steps=total_steps,
      seed=seed,
      replica=(index, replicas.total),
    ),
    replicas,
  )


# --- Evaluation ------------------------------------------------------------------------------------------


def resize_size(size):
  """Resize's shorter side for a CenterCrop of `size`: 256 for 224."""
  return int(round(size * RESIZE_RATIO))


def _half_to_even(excess):
  """round(excess / 2) with Python's round-half-to-even, for integer tensors (torchvision's CenterCrop offset)."""
  half = excess // 2
  return half + (excess % 2) * (half % 2)


def resize_centre_crop(pixels, size, resize=None):
  """torchvision Resize(resize) + CenterCrop(size) of a uint8 [H, W, 3] image, float32 [size, size, 3] in [0, 1].

  Resize scales the shorter side to `resize` and the longer to int(resize * longer / shorter) with PIL's
  bilinear filter: tf.image.resize with antialias, one pass per axis, each rounded to uint8 as PIL does;
  CenterCrop then cuts size x size at round((side - size) / 2) from the top and the left. PIL's filter
  weights are fixed-point: a pixel is rarely one grey level off Pillow's (tests/test_classifier.py).
  """
  resize = resize_size(size) if resize is None else resize
  if resize < size:
    raise ValueError(f"resize={resize} is smaller than the crop {size}")
  shape = tf.shape(pixels)
  height, width = shape[0], shape[1]
  shorter, longer = tf.minimum(height, width), tf.maximum(height, width)
  new_longer = resize * longer // shorter  # int(resize * longer / shorter): exact in integers
  portrait = width <= height
  new_height = tf.where(portrait, new_longer, resize)
  new_width = tf.where(portrait, resize, new_longer)
  # PIL resamples the width, rounds to uint8 (half up), then the height, and rounds again.
  to_uint8 = lambda x: tf.floor(tf.clip_by_value(x, 0.0, 255.0) + 0.5)
  resized = to_uint8(
    tf.image.resize(tf.cast(pixels, tf.float32), tf.stack([height, new_width]), "bilinear", antialias=True)
  )
  resized = to_uint8(tf.image.resize(resized, tf.stack([new_height, new_width]), "bilinear", antialias=True))
  top, left = _half_to_even(new_height - size), _half_to_even(new_width - size)
  crop = resized[top : top + size, left : left + size]
  return tf.ensure_shape(crop, [size, size, 3]) * (1.0 / 255.0)


def stream_eval_dataset(images, indices, batch_size, size, mean, std):
  """images[indices] (sources.ImageFiles) in order, Resize + CenterCrop to size, normalised, in batches."""

  def load(index):
    return resize_centre_crop(pipeline.decode_image(images.read(index), images.describe(index)), size)

  dataset = tf.data.Dataset.from_tensor_slices(np.asarray(indices, np.int64))
  dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.batch(batch_size).map(lambda x: augment.normalize(x, mean, std))
  return dataset.prefetch(tf.data.AUTOTUNE)


def evaluation_images(source, data, batch_size):
  """(query batches or uint8 arrays, labels) of a Source's evaluation set for evaluate_classifier.

  Files: Resize + CenterCrop (stream_eval_dataset). Arrays (cifar10, digits): the whole images, as the
  soft-NN evaluation uses them.
  """
  if not source.streamed:
    return source.test_images, source.test_labels
  if source.evaluation is None:
    raise UserError(source.evaluation_hint)
  queries = stream_eval_dataset(
    source.evaluation, np.arange(len(source.evaluation)), batch_size, data.image_size, data.mean, data.std
  )
  return queries, source.evaluation.labels


def evaluate_classifier(model, images, labels, batch_size=256, mean=None, std=None):
  """Top-1 and top-5 accuracy (%) of the classifier on the queries.

  Args:
    model: a Classifier.
    images: a tf.data.Dataset of normalised float batches (stream_eval_dataset), or uint8 [N, H, W, 3]
      arrays used whole (then mean and std are required).
    labels: int [N].
  Returns:
    dict of top1, top5 (top-k with k = min(5, classes)) and num_test.
  """
  if not isinstance(images, tf.data.Dataset):
    if mean is None or std is None:
      raise ValueError("mean and std are required for image arrays")
    images = pipeline.eval_dataset(images, batch_size, mean, std)
  labels = np.asarray(labels, np.int64)
  k = min(5, model.num_classes)
  top1 = top5 = seen = 0
  for batch in images:
    logits = tf.cast(model(batch, training=False), tf.float32)
    expected = labels[seen : seen + len(logits)]
    best = tf.math.top_k(logits, k=k).indices.numpy()
    top1 += int(np.sum(best[:, 0] == expected))
    top5 += int(np.sum(np.any(best == expected[:, None], axis=1)))
    seen += len(logits)
  if seen != len(labels):
    raise ValueError(f"{seen} images for {len(labels)} labels")
  return {"top1": 100.0 * top1 / seen, "top5": 100.0 * top5 / seen, "top_k": k, "num_test": seen}
