"""tf.data input pipelines of the three stages and of evaluation (METHOD.md sections 4, 6, 7, 10).

Training pipelines take the stage's index plan (utils/data/sampling.py), which says which images every step
reads, and augment them with the config's `data` section (augment.AugmentSpec):

  pretrain_dataset, stream_pretrain_dataset   PAWS: multi-crop views of the unlabeled batch, and supports.
  finetune_dataset, stream_finetune_dataset   SuNCEt: flip-only views of class-stratified labeled batches.
  classifier_dataset                          classifier fine-tuning: RandomResizedCrop + flip, with labels.
  eval_dataset, stream_eval_dataset           whole images in order, normalised.

The in-memory pipelines read uint8 arrays; the stream_ ones (and classifier_dataset given files) read
image_files.ImageFiles and give the same batches, to float rounding (streamed crops are resized one image
at a time). Augmentations are stateless and seeded by (seed, step), so a stream restarted at step s is the
stream that was cut at s, and parallel `map` does not change the result. Each training pipeline emits, for
every step, one batch per replica it feeds (sampling.Replicas), in turn: that replica's rows of the global
batch, with the random draws those rows have in the global batch.
"""

from collections.abc import Callable, Iterator, Sequence

from ml_collections import ConfigDict
import numpy as np
import tensorflow as tf

from utils.data import augment, decoding, sampling
from utils.data.image_files import ImageFiles

# Seed streams of the views: pre-training's (and the classifier's one view), fine-tuning's.
_VIEWS = 1
_SUNCET_VIEWS = 2


def _view_seeds(seed, step, stream, count):
  """The `count` view seeds of a step: [2] tensors, a function of (seed, step, stream) only."""
  step_seed = tf.stack([tf.cast(seed, tf.int64) * 1000 + stream, tf.cast(step, tf.int64)])
  return tf.unstack(tf.random.experimental.stateless_split(step_seed, count))


def _flip_views(batch, seeds, spec, rows):
  """One flip-only, normalised view of `batch` per seed (no flip when spec.flip is off), stacked."""
  return tf.stack(
    [
      augment.normalize(augment.random_flip(batch, view_seed, rows=rows) if spec.flip else batch, spec.mean, spec.std)
      for view_seed in seeds
    ]
  )


def pretrain_dataset(
  images: np.ndarray,
  plan: sampling.PawsPlan,
  data: ConfigDict,
  pretrain: ConfigDict,
  *,
  start_step: int,
  total_steps: int,
  replicas: sampling.Replicas = sampling.ONE_DEVICE,
) -> tf.data.Dataset:
  """Per-step, per-replica batches for PAWS pre-training (METHOD.md section 4).

  Args:
    images: uint8 [N, H, W, 3], the whole unlabeled training set (plan.num_unlabeled images).
    plan: the stage's sampling.PawsPlan (its geometry has replicas.total replicas).
    data: the config's `data` section (crop sizes and scales, augmentation, mean/std).
    pretrain: the config's `pretrain` section (multicrop, support_views).
    start_step, total_steps: the stream covers steps [start_step, total_steps).
    replicas: the Replicas this pipeline feeds (default: one device).
  Returns:
    tf.data.Dataset of (views, supports), one element per step and replica (in the order of
    replicas.ids): views is a tuple of 2 + multicrop float32 batches [local_batch, S, S, 3]
    (two large, then small crops), the replica's rows of the global batch; supports is float32
    [support_views, local_support, S, S, 3], its rows of the support batch.
  """
  p, geometry, seed = pretrain, plan.geometry, plan.seed
  spec = augment.AugmentSpec.from_config(data)
  images = tf.constant(images)
  labeled_images = tf.gather(images, plan.labeled)
  large, small = data.large_crop_size, data.small_crop_size

  def index_stream():
    for step in range(start_step, total_steps):
      yield step, plan.batch(step), plan.support_positions(step)

  def replica_dataset(replica):
    rows, support_rows = geometry.batch_rows(replica), geometry.support_rows(replica)

    def make_views(step, batch_indices, support_positions):
      batch = tf.gather(images, rows.take(batch_indices))
      seeds = _view_seeds(seed, step, _VIEWS, 2 + p.multicrop + p.support_views)
      views = [augment.augment_batch(batch, s, large, data.large_crop_scale, spec, rows=rows) for s in seeds[:2]]
      views += [
        augment.augment_batch(batch, s, small, data.small_crop_scale, spec, rows=rows)
        for s in seeds[2 : 2 + p.multicrop]
      ]
      support = tf.gather(labeled_images, support_rows.take(support_positions))
      supports = [
        augment.augment_batch(support, s, large, data.large_crop_scale, spec, rows=support_rows)
        for s in seeds[2 + p.multicrop :]
      ]
      return tuple(views), tf.stack(supports)

    signature = (
      tf.TensorSpec([], tf.int64),
      tf.TensorSpec([geometry.batch], tf.int64),
      tf.TensorSpec([geometry.support], tf.int64),
    )
    dataset = sampling.index_dataset(index_stream, signature)
    return dataset.map(make_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  return sampling.round_robin(replica_dataset, replicas).prefetch(tf.data.AUTOTUNE)


def finetune_dataset(
  images: np.ndarray,
  plan: sampling.SuncetPlan,
  finetune: ConfigDict,
  data: ConfigDict,
  *,
  start_step: int,
  total_steps: int,
  replicas: sampling.Replicas = sampling.ONE_DEVICE,
) -> tf.data.Dataset:
  """Class-stratified flip-only batches for fine-tuning (METHOD.md section 6), one per step and replica.

  Args:
    images: uint8 [N, H, W, 3], the training images (only the labeled ones are read).
    plan: the stage's sampling.SuncetPlan.
    finetune: the config's `finetune` section (views).
    data: the config's `data` section (flip, mean, std). With flip off (data that is not
      mirror-symmetric, e.g. digits) the views are the un-augmented images.
    start_step, total_steps, replicas: as pretrain_dataset.
  Returns:
    A dataset of float32 [views, local_support, H, W, 3]: each replica's rows of the step's batch, in the
    order of replicas.ids.
  """
  geometry, seed = plan.geometry, plan.seed
  spec = augment.AugmentSpec.from_config(data)
  labeled_images = tf.constant(np.asarray(images)[plan.labeled])

  def index_stream():
    for step in range(start_step, total_steps):
      yield step, plan.support_positions(step)

  def replica_dataset(replica):
    rows = geometry.support_rows(replica)

    def make_views(step, support_positions):
      batch = tf.gather(labeled_images, rows.take(support_positions))
      return _flip_views(batch, _view_seeds(seed, step, _SUNCET_VIEWS, finetune.views), spec, rows)

    signature = (tf.TensorSpec([], tf.int64), tf.TensorSpec([geometry.support], tf.int64))
    dataset = sampling.index_dataset(index_stream, signature)
    return dataset.map(make_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  return sampling.round_robin(replica_dataset, replicas).prefetch(tf.data.AUTOTUNE)


def eval_dataset(images: np.ndarray, batch_size: int, mean: Sequence[float], std: Sequence[float]) -> tf.data.Dataset:
  """Un-augmented, normalised batches in order (METHOD.md section 7: no crop)."""
  dataset = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
  dataset = dataset.map(lambda x: augment.normalize(x, mean, std), num_parallel_calls=tf.data.AUTOTUNE)
  return dataset.prefetch(tf.data.AUTOTUNE)


def _cut_views(encoded, description, groups, sizes):
  """The views of one image: a list of float32 [size, size, 3] in [0, 1], cropped, resized and flipped.

  groups: one image's augment.crop_draws of each view group, sizes: each group's output size. The image is
  decoded once for all of them; a single view decodes only its crop's window of a JPEG.
  """
  counts = [draws["flip"].shape[0] for draws in groups]
  if sum(counts) == 1:
    draws, size = next((draws, size) for draws, size, count in zip(groups, sizes, counts) if count)
    pixels, boxes = decoding.decode_one_box(encoded, description, draws)
    boxes_and_flips = [(boxes, draws["flip"], size)]
  else:
    pixels = decoding.decode_image(encoded, description)
    shape = tf.shape(pixels)
    boxes_and_flips = [
      (augment.crop_boxes(draws, shape[0], shape[1]), draws["flip"], size) for draws, size in zip(groups, sizes)
    ]
  views = []
  for boxes, flips, size in boxes_and_flips:
    for view in range(flips.shape[0]):
      crop = decoding.resize_box(pixels, boxes[view], size)
      # tf.cond, not tf.where: a select broadcasting a scalar condition cost as much as the resize of the view
      views.append(tf.cond(flips[view], lambda crop=crop: tf.reverse(crop, axis=[1]), lambda crop=crop: crop))
  return views


def streamed_views(
  images: ImageFiles,
  index_batches: Callable[[], Iterator[tuple[int, np.ndarray]]],
  view_groups: Sequence[tuple[int, int, int, Sequence[float]]],
  seed: int,
  spec: augment.AugmentSpec,
  rows: sampling.Rows,
) -> tf.data.Dataset:
  """Per-step batches of cropped views of images read from files, with the draws of their colour stage.

  Args:
    images: the image_files.ImageFiles the indices point into.
    index_batches: callable returning an iterator of (step, int64 [rows.total] image indices).
    view_groups: list of (first view, number of views, size, scale): views first .. first + number - 1 of
      the step's view seeds, cut at `size` with crop `scale`.
    seed: the run's seed; a step's view seeds are those of pretrain_dataset.
    spec: the AugmentSpec.
    rows: only these rows of each batch (one replica's; Rows(0, total, total) for all), with the draws they
      have in the whole batch; only their images are read.
  Returns:
    Dataset of (crops, colour): crops a tuple of float32 [rows.count, size, size, 3] views in [0, 1], the
    groups' views in order, cropped, resized and flipped; colour the tuple of their augment.colour_draws.
    augment.apply_colour(crops[v], colour[v], spec) is augment_batch's view v of the same images.
  """
  num_seeds = max(first + count for first, count, _, _ in view_groups)
  sizes = [size for _, _, size, _ in view_groups]
  _, keep = augment.draw_rows(rows.count, rows)  # the rows' share of the whole batch's draws

  def draw(step, indices):
    seeds = _view_seeds(seed, step, _VIEWS, num_seeds)
    groups = tuple(
      keep(augment.crop_draws(seeds[first : first + n], rows.total, scale, spec.flip))
      for first, n, _, scale in view_groups
    )
    return tf.fill([rows.count], step), keep(indices), groups

  def cut(step, index, groups):
    return step, tuple(_cut_views(images.read(index), images.describe(index), groups, sizes))

  def colour(steps, views):
    seeds = _view_seeds(seed, steps[0], _VIEWS, num_seeds)
    view_seeds = [seeds[first + view] for first, count, _, _ in view_groups for view in range(count)]
    return views, tuple(augment.colour_draws(view_seed, rows.count, spec, rows) for view_seed in view_seeds)

  signature = (tf.TensorSpec([], tf.int64), tf.TensorSpec([rows.total], tf.int64))
  dataset = sampling.index_dataset(index_batches, signature)
  dataset = dataset.map(draw).unbatch()
  dataset = dataset.map(cut, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.batch(rows.count, drop_remainder=True)
  return dataset.map(colour)


def stream_pretrain_dataset(
  images: ImageFiles,
  plan: sampling.PawsPlan,
  data: ConfigDict,
  pretrain: ConfigDict,
  *,
  start_step: int,
  total_steps: int,
  replicas: sampling.Replicas = sampling.ONE_DEVICE,
) -> tf.data.Dataset:
  """pretrain_dataset for images read from files: the same steps, views and supports.

  Each image's crop boxes come from its own height and width with the draws augment_batch makes for its
  position in the batch, on the original image, decoded once for all its views (a JPEG support view decodes
  only its crop's window); crops are resized with augment_batch's PIL filter. The colour stage (jitter,
  grayscale, blur, solarize, equalize, normalisation: two thirds of the host's work per image at the
  ImageNet recipe) is left to the train step, on the accelerator: each element carries the per-image colour
  draws, and colour_pretrain_batch (called by utils/train/steps.paws_steps) turns it into pretrain_dataset's
  element. Only the images of the step's replicas are read and held in memory.

  Args:
    images: image_files.ImageFiles, all unlabeled training images (the training images first).
    Other arguments: as pretrain_dataset.
  Returns:
    tf.data.Dataset of (views, supports, colour): views and supports as pretrain_dataset's but cropped,
    resized and flipped only, in [0, 1]; colour the augment.colour_draws of the 2 + multicrop views, then
    of the support views.
  """
  p, geometry = pretrain, plan.geometry
  spec = augment.AugmentSpec.from_config(data)
  large, small = data.large_crop_size, data.small_crop_size

  def unlabeled_batches():
    for step in range(start_step, total_steps):
      yield step, plan.batch(step)

  def support_batches():
    for step in range(start_step, total_steps):
      yield step, plan.supports(step)

  def replica_dataset(replica):
    unlabeled_groups = [(0, 2, large, data.large_crop_scale), (2, p.multicrop, small, data.small_crop_scale)]
    unlabeled = streamed_views(
      images, unlabeled_batches, unlabeled_groups, plan.seed, spec, geometry.batch_rows(replica)
    )
    support_groups = [(2 + p.multicrop, p.support_views, large, data.large_crop_scale)]
    supports = streamed_views(images, support_batches, support_groups, plan.seed, spec, geometry.support_rows(replica))
    return tf.data.Dataset.zip(unlabeled, supports).map(
      lambda views, support_views: (views[0], tf.stack(support_views[0]), views[1] + support_views[1])
    )

  return sampling.round_robin(replica_dataset, replicas).prefetch(tf.data.AUTOTUNE)


def colour_pretrain_batch(
  views: Sequence[tf.Tensor], supports: tf.Tensor, colour: Sequence[dict], spec: augment.AugmentSpec
) -> tuple[tuple[tf.Tensor, ...], tf.Tensor]:
  """The colour stage of a stream_pretrain_dataset element: pretrain_dataset's (views, supports) of it.

  views: the 2 + multicrop crop batches; supports [support_views, n, S, S, 3]; colour: the element's draws.
  """
  coloured = tuple(augment.apply_colour(view, draws, spec) for view, draws in zip(views, colour))
  support_colour = colour[len(views) :]
  supports = tf.stack([augment.apply_colour(supports[v], draws, spec) for v, draws in enumerate(support_colour)])
  return coloured, supports


def stream_finetune_dataset(
  images: ImageFiles,
  plan: sampling.SuncetPlan,
  finetune: ConfigDict,
  data: ConfigDict,
  *,
  start_step: int,
  total_steps: int,
  replicas: sampling.Replicas = sampling.ONE_DEVICE,
) -> tf.data.Dataset:
  """finetune_dataset for images read from files: whole images (centre squares) at data.image_size.

  Args:
    images: image_files.ImageFiles of the training images.
    Other arguments: as finetune_dataset.
  Returns:
    A dataset of float32 [views, local_support, image_size, image_size, 3], as finetune_dataset.
  """
  geometry, seed = plan.geometry, plan.seed
  spec = augment.AugmentSpec.from_config(data)
  load = decoding.image_loader(images, data.image_size)

  def replica_dataset(replica):
    rows = geometry.support_rows(replica)

    def index_stream():
      for step in range(start_step, total_steps):
        yield step, rows.take(plan.supports(step))

    def make_views(steps, batch):
      return _flip_views(batch, _view_seeds(seed, steps[0], _SUNCET_VIEWS, finetune.views), spec, rows)

    signature = (tf.TensorSpec([], tf.int64), tf.TensorSpec([rows.count], tf.int64))
    dataset = sampling.index_dataset(index_stream, signature)
    dataset = dataset.map(lambda step, indices: (tf.fill([rows.count], step), indices)).unbatch()
    dataset = dataset.map(
      lambda step, index: (step, load(index)), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    dataset = dataset.batch(rows.count, drop_remainder=True)
    return dataset.map(make_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  return sampling.round_robin(replica_dataset, replicas).prefetch(tf.data.AUTOTUNE)


def stream_eval_dataset(
  images: ImageFiles,
  indices: Sequence[int],
  data: ConfigDict,
  batch_size: int,
  transform: Callable[[tf.Tensor, int], tf.Tensor] = decoding.centre_square,
) -> tf.data.Dataset:
  """eval_dataset for images read from files: images[indices] in order, at data.image_size, normalised.

  transform: how an image becomes image_size x image_size: decoding.centre_square (its centred square resized
  in one step: BatchNorm re-estimation) or decoding.resize_centre_crop (torchvision Resize + CenterCrop, the
  reference's evaluation transform: soft-NN evaluation and the classifier's).
  """
  dataset = tf.data.Dataset.from_tensor_slices(np.asarray(indices, np.int64))
  dataset = dataset.map(
    decoding.image_loader(images, data.image_size, transform), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
  )
  dataset = dataset.batch(batch_size).map(lambda x: augment.normalize(x, data.mean, data.std))
  return dataset.prefetch(tf.data.AUTOTUNE)


# RandomResizedCrop scale of the reference's ImageNet fine-tuning (torchvision's default); flip on, no colour.
CROP_SCALE = (0.08, 1.0)


def classifier_dataset(
  images: np.ndarray | ImageFiles,
  plan: sampling.ClassifierPlan,
  data: ConfigDict,
  *,
  start_step: int,
  total_steps: int,
  replicas: sampling.Replicas = sampling.ONE_DEVICE,
) -> tf.data.Dataset:
  """(images, labels) batches of the labeled subset: RandomResizedCrop(image_size, scale 0.08-1) + flip.

  Args:
    images: uint8 [N, H, W, 3] training images, or an image_files.ImageFiles of them (streamed from files).
    plan: the stage's sampling.ClassifierPlan; each step's images and random draws depend on (seed, step) only.
    data: the config's `data` section (image_size, flip, mean, std; no colour operation is applied).
    start_step, total_steps, replicas: as pretrain_dataset.
  Returns:
    Dataset of (float32 [local_batch, S, S, 3] normalised, int64 [local_batch]), one element per step and
    replica: the replica's rows of every global batch, augmented with the global batch's draws.
  """
  geometry, seed = plan.geometry, plan.seed
  size = data.image_size
  spec = augment.AugmentSpec.from_config(data).crop_and_flip()
  in_memory = isinstance(images, np.ndarray)
  if in_memory:
    images = tf.constant(images)

  def index_stream():
    for step in range(start_step, total_steps):
      yield step, plan.batch(step)

  def replica_dataset(replica):
    rows = geometry.batch_rows(replica)

    def label_stream():
      for step in range(start_step, total_steps):
        yield step, rows.take(plan.batch_labels(step))

    if in_memory:

      def make_batch(step, indices):
        view_seed = _view_seeds(seed, step, _VIEWS, 1)[0]
        return augment.augment_batch(
          tf.gather(images, rows.take(indices)), view_seed, size, CROP_SCALE, spec, rows=rows
        )

      signature = (tf.TensorSpec([], tf.int64), tf.TensorSpec([geometry.batch], tf.int64))
      views = sampling.index_dataset(index_stream, signature)
      views = views.map(make_batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:  # one view per step; only this replica's images are read
      views = streamed_views(images, index_stream, [(0, 1, size, CROP_SCALE)], seed, spec, rows)
      views = views.map(  # the colour stage (here: normalisation) on the host, steps in parallel as before
        lambda crops, colour: augment.apply_colour(crops[0], colour[0], spec),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
      )
    targets = sampling.index_dataset(label_stream, (tf.TensorSpec([], tf.int64), tf.TensorSpec([rows.count], tf.int64)))
    targets = targets.map(lambda step, labels: labels)
    return tf.data.Dataset.zip(views, targets)

  return sampling.round_robin(replica_dataset, replicas).prefetch(tf.data.AUTOTUNE)
