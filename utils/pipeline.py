"""tf.data input pipelines: multi-crop unlabeled views and class-stratified supports (METHOD.md section 4).

All sampling of indices happens in NumPy from seeds that depend only on the
step, so a stream restarted at step s is exactly the stream that was cut at s;
no iterator state needs checkpointing. Augmentations are stateless and seeded
by (seed, step), so parallel `map` does not change the result either.
"""

import numpy as np
import tensorflow as tf

from utils import augment
from utils.errors import UserError


class SupportSampler:
  """Class-stratified index batches for the support set (METHOD.md section 4).

  Each batch holds `classes_per_batch` classes x `images_per_class` images,
  laid out interleaved by class (position i has the (i mod K)-th chosen
  class). As the reference does with all classes in every batch (CIFAR-10),
  every batch is drawn afresh: its classes are the first `classes_per_batch`
  of a new permutation of the classes, and each of them gives the first
  `images_per_class` images of a new permutation of its labeled images. So no
  image appears twice within a batch, and batches are independent of each
  other (an image is in each batch with probability images_per_class / class
  size, whatever came before). Batch `step` is a function of (seed, step)
  only: a stream resumed at any step needs no replay.
  """

  # A trailing non-zero word keeps these generators apart from unlabeled_indices'
  # default_rng([seed, epoch]): numpy's SeedSequence ignores trailing zero words.
  STREAM = 1

  def __init__(self, labels, classes_per_batch, images_per_class, seed):
    labels = np.asarray(labels)
    self.classes = np.unique(labels)
    if classes_per_batch > len(self.classes):
      raise UserError(
        f"classes_per_batch={classes_per_batch} but the labeled set has only "
        f"{len(self.classes)} classes; lower classes_per_batch"
      )
    self.members = [np.flatnonzero(labels == c) for c in self.classes]
    smallest = min(len(m) for m in self.members)
    if images_per_class > smallest:
      raise UserError(
        f"images_per_class={images_per_class} support images per class but a class has only "
        f"{smallest} labeled images; lower images_per_class or label more images per class"
      )
    self.classes_per_batch = classes_per_batch
    self.images_per_class = images_per_class
    self.seed = seed
    self.step = 0

  def batch(self, step):
    """Returns the int64 [images_per_class * classes_per_batch] indices of batch `step`, interleaved by class."""
    rng = np.random.default_rng([self.seed, step, self.STREAM])
    chosen = rng.permutation(len(self.classes))[: self.classes_per_batch]
    columns = [rng.permutation(self.members[c])[: self.images_per_class] for c in chosen]
    return np.stack(columns, axis=1).reshape(-1).astype(np.int64)

  def next_batch(self):
    """The batch of the next step (0, 1, ... since construction)."""
    self.step += 1
    return self.batch(self.step - 1)


def unlabeled_indices(num_images, batch_size, step, seed):
  """Indices of the unlabeled batch at `step`: a fresh permutation per epoch, last partial batch dropped."""
  steps_per_epoch = num_images // batch_size
  epoch, position = divmod(step, steps_per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_images)
  return order[position * batch_size : (position + 1) * batch_size]


def support_batches(labels, classes_per_batch, images_per_class, seed, start_step, total_steps):
  """Yields (step, support indices) for steps [start_step, total_steps); each batch depends on (seed, step) only."""
  sampler = SupportSampler(labels, classes_per_batch, images_per_class, seed)
  for step in range(start_step, total_steps):
    yield step, sampler.batch(step)


def _step_seed(seed, step, stream):
  return tf.stack([tf.cast(seed, tf.int64) * 1000 + stream, tf.cast(step, tf.int64)])


def _augment_views(batch, seeds, size, scale, data):
  """One augmented view of `batch` per seed, with the config's `data` augmentation settings."""
  return [
    augment.augment_batch(
      batch,
      view_seed,
      size,
      scale,
      flip=data.flip,
      color_jitter_prob=data.color_jitter_prob,
      color_jitter_strength=data.color_jitter_strength,
      solarize_prob=data.solarize_prob,
      equalize_prob=data.equalize_prob,
      mean=data.mean,
      std=data.std,
      # The ImageNet recipe's ops; data sections built by hand (tests, benchmarks) may leave them out.
      grayscale_prob=data.get("grayscale_prob", 0.0),
      blur_prob=data.get("blur_prob", 0.0),
      blur_radius=data.get("blur_radius", (0.1, 2.0)),
    )
    for view_seed in seeds
  ]


def pretrain_dataset(images, labeled_indices, labeled_labels, data, pretrain, *, start_step, total_steps, seed):
  """Per-step batches for PAWS pre-training (METHOD.md section 4).

  Args:
    images: uint8 [N, H, W, 3], the whole unlabeled training set.
    labeled_indices, labeled_labels: the labeled subset (indices into images).
    data: the config's `data` section (crop sizes and scales, augmentation, mean/std).
    pretrain: the config's `pretrain` section (batch_size, multicrop, classes_per_batch,
      images_per_class, support_views).
    start_step, total_steps: the stream covers steps [start_step, total_steps).
    seed: augmentation and sampling seed.
  Returns:
    tf.data.Dataset of (views, supports): views is a tuple of 2 + multicrop
    float32 batches [batch_size, S, S, 3] (two large, then small crops);
    supports is float32 [support_views, images_per_class, classes_per_batch,
    S, S, 3] so replicas can slice their own images per class.
  """
  p = pretrain
  images = tf.constant(images)
  labeled_images = tf.gather(images, labeled_indices)
  large = data.large_crop_size

  def index_stream():
    for step, support in support_batches(
      labeled_labels, p.classes_per_batch, p.images_per_class, seed, start_step, total_steps
    ):
      yield step, unlabeled_indices(len(images), p.batch_size, step, seed), support

  def make_views(step, batch_indices, support_indices):
    batch = tf.gather(images, batch_indices)
    seeds = tf.unstack(
      tf.random.experimental.stateless_split(_step_seed(seed, step, 1), 2 + p.multicrop + p.support_views)
    )
    views = _augment_views(batch, seeds[:2], large, data.large_crop_scale, data) + _augment_views(
      batch, seeds[2 : 2 + p.multicrop], data.small_crop_size, data.small_crop_scale, data
    )
    support = tf.gather(labeled_images, support_indices)
    supports = _augment_views(support, seeds[2 + p.multicrop :], large, data.large_crop_scale, data)
    supports = tf.reshape(
      tf.stack(supports), [p.support_views, p.images_per_class, p.classes_per_batch, large, large, 3]
    )
    return tuple(views), supports

  signature = (
    tf.TensorSpec([], tf.int64),
    tf.TensorSpec([p.batch_size], tf.int64),
    tf.TensorSpec([p.classes_per_batch * p.images_per_class], tf.int64),
  )
  dataset = tf.data.Dataset.from_generator(index_stream, output_signature=signature)
  dataset = dataset.map(make_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return dataset.prefetch(tf.data.AUTOTUNE)


def finetune_dataset(labeled_images, labeled_labels, finetune, data, *, start_step, total_steps, seed):
  """Class-stratified flip-only batches for fine-tuning (METHOD.md section 6).

  Args:
    labeled_images, labeled_labels: the labeled subset.
    finetune: the config's `finetune` section (classes_per_batch, images_per_class, views).
    data: the config's `data` section (flip, mean, std). With flip off (data that is not
      mirror-symmetric, e.g. digits) the views are the un-augmented images.
  Returns:
    A dataset of float32 [views, images_per_class, classes_per_batch, H, W, 3].
  """
  f = finetune
  labeled_images = tf.constant(labeled_images)
  height, width = labeled_images.shape[1:3]

  def index_stream():
    return support_batches(labeled_labels, f.classes_per_batch, f.images_per_class, seed, start_step, total_steps)

  def make_views(step, support_indices):
    batch = tf.gather(labeled_images, support_indices)
    seeds = tf.random.experimental.stateless_split(_step_seed(seed, step, 2), f.views)
    flipped = [
      augment.normalize(augment.random_flip(batch, seeds[v]) if data.flip else batch, data.mean, data.std)
      for v in range(f.views)
    ]
    return tf.reshape(tf.stack(flipped), [f.views, f.images_per_class, f.classes_per_batch, height, width, 3])

  signature = (tf.TensorSpec([], tf.int64), tf.TensorSpec([f.classes_per_batch * f.images_per_class], tf.int64))
  dataset = tf.data.Dataset.from_generator(index_stream, output_signature=signature)
  dataset = dataset.map(make_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return dataset.prefetch(tf.data.AUTOTUNE)


def eval_dataset(images, batch_size, mean, std):
  """Un-augmented, normalised batches in order (METHOD.md section 7: no crop)."""
  dataset = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
  dataset = dataset.map(lambda x: augment.normalize(x, mean, std), num_parallel_calls=tf.data.AUTOTUNE)
  return dataset.prefetch(tf.data.AUTOTUNE)
