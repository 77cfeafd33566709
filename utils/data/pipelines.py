"""tf.data input pipelines: multi-crop unlabeled views and class-stratified supports (METHOD.md section 4).

All sampling of indices happens in NumPy from seeds that depend only on the
step, so a stream restarted at step s is exactly the stream that was cut at s;
no iterator state needs checkpointing. Augmentations are stateless and seeded
by (seed, step), so parallel `map` does not change the result either.

Every pipeline feeds replicas (README, Before a long GPU run): given a
`Replicas`, it emits for each step one batch per replica it serves, in turn,
each holding only that replica's rows of the global batch, with the random
draws those rows have in the global batch. tf.distribute's
distribute_datasets_from_function hands consecutive elements to a worker's
devices in turn and prefetches them there (`distribute`), so no device
receives, and no worker builds, more than its own share.
"""

import ml_collections
import numpy as np
import tensorflow as tf

from utils.data import augment, decoding, sampling
from utils.errors import UserError


def _step_seed(seed, step, stream):
  return tf.stack([tf.cast(seed, tf.int64) * 1000 + stream, tf.cast(step, tf.int64)])


def _augment_views(batch, seeds, size, scale, data, rows):
  """One augmented view of `batch` per seed, with the config's `data` augmentation settings.

  rows: (start, total), the batch's rows in the global batch (augment.augment_batch).
  """
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
      rows=rows,
    )
    for view_seed in seeds
  ]


def pretrain_dataset(
  images,
  labeled_indices,
  labeled_labels,
  data,
  pretrain,
  *,
  start_step,
  total_steps,
  seed,
  replicas=sampling.ONE_DEVICE,
):
  """Per-step, per-replica batches for PAWS pre-training (METHOD.md section 4).

  Args:
    images: uint8 [N, H, W, 3], the whole unlabeled training set.
    labeled_indices, labeled_labels: the labeled subset (indices into images).
    data: the config's `data` section (crop sizes and scales, augmentation, mean/std).
    pretrain: the config's `pretrain` section (batch_size, multicrop, classes_per_batch,
      images_per_class, support_views, unique_classes_per_replica), sizes over all replicas.
    start_step, total_steps: the stream covers steps [start_step, total_steps).
    seed: augmentation and sampling seed.
    replicas: the Replicas this pipeline feeds (default: one device).
  Returns:
    tf.data.Dataset of (views, supports), one element per step and replica (in the order of
    replicas.ids): views is a tuple of 2 + multicrop float32 batches [batch_size / R, S, S, 3]
    (two large, then small crops), the replica's rows of the global batch; supports is float32
    [support_views, classes_per_batch * images_per_class / R, S, S, 3], its block of rows of the support
    batch (SupportSampler).
  """
  p = pretrain
  images = tf.constant(images)
  labeled_images = tf.gather(images, labeled_indices)
  large = data.large_crop_size
  local_batch = p.batch_size // replicas.total
  sampler = sampling.SupportSampler(**sampling.pretrain_supports(labeled_labels, p, seed, replicas.total))
  local_support = sampler.rows_per_replica

  def index_stream():
    for step in range(start_step, total_steps):
      yield step, sampling.unlabeled_indices(len(images), p.batch_size, step, seed), sampler.batch(step)

  def replica_dataset(replica):
    rows, support_rows = slice(replica * local_batch, (replica + 1) * local_batch), replica * local_support

    def make_views(step, batch_indices, support_indices):
      batch = tf.gather(images, batch_indices[rows])
      seeds = tf.unstack(
        tf.random.experimental.stateless_split(_step_seed(seed, step, 1), 2 + p.multicrop + p.support_views)
      )
      place = (rows.start, p.batch_size)
      views = _augment_views(batch, seeds[:2], large, data.large_crop_scale, data, place) + _augment_views(
        batch, seeds[2 : 2 + p.multicrop], data.small_crop_size, data.small_crop_scale, data, place
      )
      support = tf.gather(labeled_images, support_indices[support_rows : support_rows + local_support])
      place = (support_rows, replicas.total * local_support)
      supports = _augment_views(support, seeds[2 + p.multicrop :], large, data.large_crop_scale, data, place)
      return tuple(views), tf.stack(supports)

    signature = (
      tf.TensorSpec([], tf.int64),
      tf.TensorSpec([p.batch_size], tf.int64),
      tf.TensorSpec([replicas.total * local_support], tf.int64),
    )
    dataset = tf.data.Dataset.from_generator(index_stream, output_signature=signature)
    return dataset.map(make_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  return sampling.round_robin(replica_dataset, replicas).prefetch(tf.data.AUTOTUNE)


def finetune_dataset(
  labeled_images, labeled_labels, finetune, data, *, start_step, total_steps, seed, replicas=sampling.ONE_DEVICE
):
  """Class-stratified flip-only batches for fine-tuning (METHOD.md section 6), one per step and replica.

  Args:
    labeled_images, labeled_labels: the labeled subset.
    finetune: the config's `finetune` section (classes_per_batch, images_per_class over all replicas, views).
    data: the config's `data` section (flip, mean, std). With flip off (data that is not
      mirror-symmetric, e.g. digits) the views are the un-augmented images.
    replicas: the Replicas this pipeline feeds (default: one device).
  Returns:
    A dataset of float32 [views, classes_per_batch * images_per_class / R, H, W, 3]: each replica's block
    of rows of the step's batch (SupportSampler), in the order of replicas.ids.
  """
  f = finetune
  labeled_images = tf.constant(labeled_images)
  height, width = labeled_images.shape[1:3]
  sampler = sampling.SupportSampler(**sampling.finetune_supports(labeled_labels, f, seed, replicas.total))
  local_batch = sampler.rows_per_replica

  def index_stream():
    for step in range(start_step, total_steps):
      yield step, sampler.batch(step)

  def replica_dataset(replica):
    rows = (replica * local_batch, replicas.total * local_batch)

    def make_views(step, support_indices):
      batch = tf.gather(labeled_images, support_indices[rows[0] : rows[0] + local_batch])
      seeds = tf.random.experimental.stateless_split(_step_seed(seed, step, 2), f.views)
      flipped = [
        augment.normalize(augment.random_flip(batch, seeds[v], rows=rows) if data.flip else batch, data.mean, data.std)
        for v in range(f.views)
      ]
      return tf.stack(flipped)

    signature = (tf.TensorSpec([], tf.int64), tf.TensorSpec([rows[1]], tf.int64))
    dataset = tf.data.Dataset.from_generator(index_stream, output_signature=signature)
    return dataset.map(make_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  return sampling.round_robin(replica_dataset, replicas).prefetch(tf.data.AUTOTUNE)


def eval_dataset(images, batch_size, mean, std):
  """Un-augmented, normalised batches in order (METHOD.md section 7: no crop)."""
  dataset = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
  dataset = dataset.map(lambda x: augment.normalize(x, mean, std), num_parallel_calls=tf.data.AUTOTUNE)
  return dataset.prefetch(tf.data.AUTOTUNE)


def _cut_views(encoded, description, draws, size):
  """The V views of one image: a list of float32 [size, size, 3] in [0, 1], cropped, resized and flipped."""
  num_views = draws["flip"].shape[0]
  if num_views == 1:
    pixels, boxes = decoding._decode_one_box(encoded, description, draws)
  else:
    pixels = decoding.decode_image(encoded, description)
    shape = tf.shape(pixels)
    boxes = augment.crop_boxes(draws, shape[0], shape[1])
  views = []
  for view in range(num_views):
    crop = decoding.resize_box(pixels, boxes[view], size)
    views.append(tf.where(draws["flip"][view], tf.reverse(crop, axis=[1]), crop))
  return views


def _color_options(data):
  """augment.color_and_normalize's keyword arguments from the config's `data` section."""
  options = {
    "color_jitter_prob": data.color_jitter_prob,
    "color_jitter_strength": data.color_jitter_strength,
    "solarize_prob": data.solarize_prob,
    "equalize_prob": data.equalize_prob,
    "mean": data.mean,
    "std": data.std,
  }
  for key in ("grayscale_prob", "blur_prob", "blur_radius"):  # the ImageNet recipe's, where the config has them
    if key in data:
      options[key] = data[key]
  return options


def streamed_views(images, index_batches, batch_size, view_groups, seed, data, rows=None):
  """Per-step batches of augmented views of images read from files.

  Args:
    images: a sources.ImageFiles (read(index) -> encoded bytes, describe(index) -> name for errors).
    index_batches: callable returning an iterator of (step, int64 [batch_size] image indices).
    batch_size: images per step (the global batch).
    view_groups: list of (first view, number of views, size, scale): views first .. first + number - 1 of
      the step's view seeds, cut at `size` with crop `scale`.
    seed: the sampling seed; a step's view seeds are those of pretrain_dataset.
    data: the config's `data` section.
    rows: optional (start, count): only rows start .. start + count - 1 of each batch (one replica's), with
      the draws they have in the whole batch; only their images are read.
  Returns:
    Dataset of tuples of float32 [count, size, size, 3] views, the groups' views in order.
  """
  num_seeds = max(first + count for first, count, _, _ in view_groups)
  start, count = rows or (0, batch_size)
  _, keep = augment.draw_rows(count, (start, batch_size))  # the rows' share of the whole batch's draws

  def view_seeds(step):
    return augment._split_seed(_step_seed(seed, step, 1), num_seeds)

  def draw(step, indices):
    seeds = view_seeds(step)
    groups = tuple(
      keep(augment.crop_draws(seeds[first : first + n], batch_size, scale, data.flip))
      for first, n, _, scale in view_groups
    )
    return tf.fill([count], step), keep(indices), groups

  def cut(step, index, groups):
    encoded, description = images.read(index), images.describe(index)
    views = []
    for draws, (_, _, size, _) in zip(groups, view_groups):
      views += _cut_views(encoded, description, draws, size)
    return step, tuple(views)

  def colour(steps, views):
    seeds = view_seeds(steps[0])
    view_seed_list = [seeds[first + view] for first, count, _, _ in view_groups for view in range(count)]
    options = _color_options(data)
    return tuple(
      augment.color_and_normalize(batch, seed, rows=(start, batch_size), **options)
      for batch, seed in zip(views, view_seed_list)
    )

  signature = (tf.TensorSpec([], tf.int64), tf.TensorSpec([batch_size], tf.int64))
  dataset = tf.data.Dataset.from_generator(index_batches, output_signature=signature)
  dataset = dataset.map(draw).unbatch()
  dataset = dataset.map(cut, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.batch(count, drop_remainder=True)
  return dataset.map(colour, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def stream_pretrain_dataset(
  images,
  labeled_indices,
  labeled_labels,
  data,
  pretrain,
  *,
  start_step,
  total_steps,
  seed,
  replicas=sampling.ONE_DEVICE,
):
  """pretrain_dataset for images read from files (sources.ImageFiles): the same steps, views and supports.

  Each image's crop boxes come from its own height and width with the draws augment_batch makes for its
  position in the batch, on the original image (a JPEG support view decodes only its crop's window);
  crops are resized with augment_batch's PIL filter, then the batch gets augment_batch's colour stage.
  Only the images of the step's replicas are read and held in memory.

  Args:
    images: sources.ImageFiles, all unlabeled training images (labeled ones included).
    labeled_indices, labeled_labels: the labeled subset (indices into images).
    Other arguments: as pretrain_dataset.
  Returns:
    tf.data.Dataset of (views, supports) as pretrain_dataset.
  """
  p = pretrain
  labeled_indices = np.asarray(labeled_indices, np.int64)
  large, small = data.large_crop_size, data.small_crop_size
  local_batch = p.batch_size // replicas.total
  sampler = sampling.SupportSampler(**sampling.pretrain_supports(labeled_labels, p, seed, replicas.total))
  local_support = sampler.rows_per_replica

  def unlabeled_batches():
    for step in range(start_step, total_steps):
      yield step, sampling.unlabeled_indices(len(images), p.batch_size, step, seed)

  def support_indices():
    for step in range(start_step, total_steps):
      yield step, labeled_indices[sampler.batch(step)]

  def replica_dataset(replica):
    unlabeled = streamed_views(
      images,
      unlabeled_batches,
      p.batch_size,
      [(0, 2, large, data.large_crop_scale), (2, p.multicrop, small, data.small_crop_scale)],
      seed,
      data,
      rows=(replica * local_batch, local_batch),
    )
    supports = streamed_views(
      images,
      support_indices,
      replicas.total * local_support,
      [(2 + p.multicrop, p.support_views, large, data.large_crop_scale)],
      seed,
      data,
      rows=(replica * local_support, local_support),
    )

    return tf.data.Dataset.zip(unlabeled, supports).map(lambda views, support_views: (views, tf.stack(support_views)))

  return sampling.round_robin(replica_dataset, replicas).prefetch(tf.data.AUTOTUNE)


def stream_finetune_dataset(
  images,
  labeled_indices,
  labeled_labels,
  finetune,
  data,
  *,
  start_step,
  total_steps,
  seed,
  replicas=sampling.ONE_DEVICE,
):
  """finetune_dataset for images read from files: whole images at data.image_size, flip-only views.

  Args:
    images: sources.ImageFiles.
    labeled_indices, labeled_labels: the labeled subset (indices into images).
    Other arguments: as finetune_dataset.
  Returns:
    A dataset of float32 [views, classes_per_batch * images_per_class / R, image_size, image_size, 3], as
    finetune_dataset.
  """
  f = finetune
  size = data.image_size
  labeled_indices = np.asarray(labeled_indices, np.int64)
  sampler = sampling.SupportSampler(**sampling.finetune_supports(labeled_labels, f, seed, replicas.total))
  local_batch = sampler.rows_per_replica
  load = decoding.whole_image_loader(images, size)

  def replica_dataset(replica):
    rows = (replica * local_batch, replicas.total * local_batch)

    def index_stream():
      for step in range(start_step, total_steps):
        for index in labeled_indices[sampler.batch(step)[rows[0] : rows[0] + local_batch]]:
          yield step, index

    def make_views(steps, batch):
      seeds = tf.random.experimental.stateless_split(_step_seed(seed, steps[0], 2), f.views)
      flipped = [
        augment.normalize(augment.random_flip(batch, seeds[v], rows=rows) if data.flip else batch, data.mean, data.std)
        for v in range(f.views)
      ]
      return tf.stack(flipped)

    signature = (tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int64))
    dataset = tf.data.Dataset.from_generator(index_stream, output_signature=signature)
    dataset = dataset.map(
      lambda step, index: (step, load(index)), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    dataset = dataset.batch(local_batch, drop_remainder=True)
    return dataset.map(make_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  return sampling.round_robin(replica_dataset, replicas).prefetch(tf.data.AUTOTUNE)


def stream_eval_dataset(images, indices, batch_size, size, mean, std):
  """eval_dataset for images read from files: images[indices] in order, whole, at size x size, normalised."""
  dataset = tf.data.Dataset.from_tensor_slices(np.asarray(indices, np.int64))
  dataset = dataset.map(
    decoding.whole_image_loader(images, size), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
  )
  dataset = dataset.batch(batch_size).map(lambda x: augment.normalize(x, mean, std))
  return dataset.prefetch(tf.data.AUTOTUNE)


# RandomResizedCrop scale of the reference's ImageNet fine-tuning (torchvision's default); flip on, no colour.
CROP_SCALE = (0.08, 1.0)


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
      yield step, labeled_indices[sampling.batch_positions(len(labeled_indices), batch_size, step, seed)]

  def label_stream():
    for step in range(start_step, total_steps):
      yield labels[sampling.batch_positions(len(labeled_indices), batch_size, step, seed)][rows]

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
    views = streamed_views(images, index_stream, batch_size, groups, seed, plain, rows=(rows.start, local))
    views = views.map(lambda view: view)  # (view,) -> view
  targets = tf.data.Dataset.from_generator(label_stream, output_signature=tf.TensorSpec([local], tf.int64))
  return tf.data.Dataset.zip(views, targets).prefetch(tf.data.AUTOTUNE)


def source_dataset(source, labeled, config, *, start_step, total_steps, seed, replica=(0, 1)):
  """classifier_dataset of a utils/sources.py Source's labeled subset (arrays or files)."""
  images = source.train if source.streamed else source.train_images
  labeled = np.asarray(labeled, np.int64)
  batch_size = config.finetune.batch_size
  source.watch_steps(images, lambda step: labeled[sampling.batch_positions(len(labeled), batch_size, step, seed)])
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
  return sampling.round_robin(
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


def stream_centre_crop_dataset(images, indices, batch_size, size, mean, std):
  """images[indices] (sources.ImageFiles) in order, Resize + CenterCrop to size, normalised, in batches."""

  def load(index):
    return decoding.resize_centre_crop(decoding.decode_image(images.read(index), images.describe(index)), size)

  dataset = tf.data.Dataset.from_tensor_slices(np.asarray(indices, np.int64))
  dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.batch(batch_size).map(lambda x: augment.normalize(x, mean, std))
  return dataset.prefetch(tf.data.AUTOTUNE)
