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

import functools
import math
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from utils import augment
from utils.errors import UserError


class Replicas(NamedTuple):
  """The replicas one input pipeline feeds.

  ids: their replica ids (replica_id_in_sync_group), in the order the pipeline emits their batches;
  total: the number of replicas in sync (all workers). The default is a single device.
  """

  ids: tuple = (0,)
  total: int = 1


ONE_DEVICE = Replicas()


def replicas_for(strategy, input_context):
  """The Replicas of one worker's input pipeline under distribute_datasets_from_function.

  Worker w (input pipeline w) of a strategy with L devices per worker runs replicas w*L .. w*L + L - 1,
  and tf.distribute gives its devices consecutive elements of its dataset in turn.
  """
  local = strategy.num_replicas_in_sync // input_context.num_input_pipelines
  first = input_context.input_pipeline_id * local
  return Replicas(tuple(range(first, first + local)), strategy.num_replicas_in_sync)


def distribute(strategy, make_dataset):
  """The distributed dataset of make_dataset(replicas): each worker builds only its replicas' batches.

  distribute_datasets_from_function prefetches each batch to its device (fetch-to-device is on by default),
  so the host-to-device copy is off the step's critical path.
  """
  return strategy.distribute_datasets_from_function(
    lambda input_context: make_dataset(replicas_for(strategy, input_context))
  )


def round_robin(replica_dataset, replicas):
  """replica_dataset(replica id) for each of replicas.ids, taken in turn: step 0 of each, then step 1, ..."""
  datasets = [replica_dataset(replica) for replica in replicas.ids]
  if len(datasets) == 1:
    return datasets[0]
  choice = tf.data.Dataset.range(len(datasets)).repeat()
  return tf.data.Dataset.choose_from_datasets(datasets, choice)


def support_rows_per_replica(classes_per_batch, images_per_class, num_replicas, unique_classes=False, section=""):
  """Rows of the support batch each of num_replicas replicas holds: K * images_per_class / R.

  Raises UserError when the batch cannot be shared evenly: its K * images_per_class rows by the replicas,
  or with unique classes (each replica its own K classes) images_per_class by the replicas.
  section: the config section the sizes come from ("pretrain."), for the message.
  """
  if unique_classes and images_per_class % num_replicas:
    raise UserError(
      f"{section}images_per_class={images_per_class} must divide by the {num_replicas} replicas with "
      "unique classes per replica (each replica draws images_per_class / replicas images of its classes)"
    )
  rows = classes_per_batch * images_per_class
  if rows % num_replicas:
    raise UserError(
      f"the {rows} support images per step ({section}classes_per_batch={classes_per_batch} x "
      f"images_per_class={images_per_class}) must divide by the {num_replicas} replicas; change images_per_class"
    )
  return rows // num_replicas


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

  With R replicas the batch is cut into R consecutive blocks of
  support_rows_per_replica rows, one per replica. Without unique classes these
  are consecutive rows of the one-device batch (any images_per_class works as
  long as the K * images_per_class rows divide by R; a block's classes then
  follow from its rows' positions, losses.support_labels); with
  `unique_classes` (the reference's ImageNet setting), replica r gets
  images_per_class / R images of each of classes r*K .. r*K + K - 1 of the
  permutation, so the R replicas support R*K different classes.
  """

  # A trailing non-zero word keeps these generators apart from unlabeled_indices'
  # default_rng([seed, epoch]): numpy's SeedSequence ignores trailing zero words.
  STREAM = 1

  def __init__(self, labels, classes_per_batch, images_per_class, seed, num_replicas=1, unique_classes=False):
    self.rows_per_replica = support_rows_per_replica(classes_per_batch, images_per_class, num_replicas, unique_classes)
    labels = np.asarray(labels)
    self.classes = np.unique(labels)
    num_classes = classes_per_batch * (num_replicas if unique_classes else 1)
    if num_classes > len(self.classes):
      per_replica = f" x {num_replicas} replicas (unique_classes_per_replica)" if unique_classes else ""
      raise UserError(
        f"classes_per_batch={classes_per_batch}{per_replica} but the labeled set has only "
        f"{len(self.classes)} classes; lower classes_per_batch"
      )
    self.members = [np.flatnonzero(labels == c) for c in self.classes]
    smallest = min(len(m) for m in self.members)
    per_class = images_per_class // num_replicas if unique_classes else images_per_class
    if per_class > smallest:
      raise UserError(
        f"images_per_class={images_per_class} support images per class but a class has only "
        f"{smallest} labeled images; lower images_per_class or label more images per class"
      )
    self.num_classes = num_classes
    self.per_class = per_class
    self.num_replicas = num_replicas
    self.unique_classes = unique_classes
    self.seed = seed
    self.step = 0

  def batch(self, step):
    """The int64 indices of batch `step`, interleaved by class; replica r's are rows r*n .. r*n + n - 1."""
    rng = np.random.default_rng([self.seed, step, self.STREAM])
    chosen = rng.permutation(len(self.classes))[: self.num_classes]
    columns = [rng.permutation(self.members[c])[: self.per_class] for c in chosen]
    batch = np.stack(columns, axis=1)  # [per_class, num_classes]
    if self.unique_classes:  # replica r's block: its K columns
      batch = batch.reshape(self.per_class, self.num_replicas, -1).transpose(1, 0, 2)
    return batch.reshape(-1).astype(np.int64)

  def next_batch(self):
    """The batch of the next step (0, 1, ... since construction)."""
    self.step += 1
    return self.batch(self.step - 1)


def unlabeled_indices(num_images, batch_size, step, seed):
  """Indices of the unlabeled batch at `step`: a fresh permutation per epoch, last partial batch dropped."""
  steps_per_epoch = num_images // batch_size
  epoch, position = divmod(step, steps_per_epoch)
  return _epoch_order(num_images, seed, epoch)[position * batch_size : (position + 1) * batch_size]


@functools.lru_cache(maxsize=4)
def _epoch_order(num_images, seed, epoch):
  """One epoch's permutation, computed once per epoch, not per step (1.3 M images: ~30 ms each time)."""
  order = np.random.default_rng([seed, epoch]).permutation(num_images)
  order.flags.writeable = False  # shared by every step of the epoch
  return order


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


def finetune_supports(labels, finetune, seed, num_replicas):
  """SupportSampler's arguments for fine-tuning's class-stratified batches over num_replicas replicas."""
  f = finetune
  return dict(
    labels=labels,
    classes_per_batch=f.classes_per_batch,
    images_per_class=f.images_per_class,
    seed=seed,
    num_replicas=num_replicas,
  )


def pretrain_supports(labels, pretrain, seed, num_replicas):
  """SupportSampler's arguments for pre-training's supports over num_replicas replicas."""
  p = pretrain
  return dict(
    labels=labels,
    classes_per_batch=p.classes_per_batch,
    images_per_class=p.images_per_class,
    seed=seed,
    num_replicas=num_replicas,
    unique_classes=p.unique_classes_per_replica,
  )


def pretrain_dataset(
  images, labeled_indices, labeled_labels, data, pretrain, *, start_step, total_steps, seed, replicas=ONE_DEVICE
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
  sampler = SupportSampler(**pretrain_supports(labeled_labels, p, seed, replicas.total))
  local_support = sampler.rows_per_replica

  def index_stream():
    for step in range(start_step, total_steps):
      yield step, unlabeled_indices(len(images), p.batch_size, step, seed), sampler.batch(step)

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

  return round_robin(replica_dataset, replicas).prefetch(tf.data.AUTOTUNE)


def finetune_dataset(
  labeled_images, labeled_labels, finetune, data, *, start_step, total_steps, seed, replicas=ONE_DEVICE
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
  sampler = SupportSampler(**finetune_supports(labeled_labels, f, seed, replicas.total))
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

  return round_robin(replica_dataset, replicas).prefetch(tf.data.AUTOTUNE)


def eval_dataset(images, batch_size, mean, std):
  """Un-augmented, normalised batches in order (METHOD.md section 7: no crop)."""
  dataset = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
  dataset = dataset.map(lambda x: augment.normalize(x, mean, std), num_parallel_calls=tf.data.AUTOTUNE)
  return dataset.prefetch(tf.data.AUTOTUNE)


# --- Streamed images (utils/sources.py): decoded, cropped and resized inside the pipeline ------------------
#
# The in-memory functions above gather uint8 arrays. Images read from files differ in size, so here each
# image is read, decoded and cut into its views on its own (a parallel map over the images of a step), and
# the batched colour stage of augment.py runs on the batch of crops. Which images a step uses and every
# random draw are those of the in-memory path: the same images in the same order give the same batches
# (tests/test_sources.py), and a stream restarted at step s is the stream that was cut at s.

# What augment_batch crops with (augment.sample_crop_boxes' defaults).
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
# Decoding a crop window of a chroma-subsampled JPEG upsamples the chroma at the window's edges differently
# from a full decode; a window widened to 16-pixel blocks plus one block on each side decodes the crop
# inside it exactly as a full decode does (tests/test_sources.py checks 4:4:4, 4:2:2, 4:2:0, progressive).
_JPEG_BLOCK = 16


def _split_seed(seed, count):
  return tf.unstack(tf.random.experimental.stateless_split(seed, count))


def crop_draws(view_seeds, num_images, scale, flip):
  """The random numbers augment_batch draws for the crop and flip of each view, per image.

  augment_batch(images, view_seed, ...) splits view_seed into (crop, flip, jitter, solarize, equalize)
  seeds, and sample_crop_boxes splits the crop seed into (area, ratio, top, left). These are the same
  draws, before any image size is known, so each image can turn them into its own boxes
  (`crop_boxes`) once it is decoded.

  Args:
    view_seeds: list of V seeds, one per view.
    num_images: images in the batch (the first dimension of every draw).
    scale: (min, max) crop area fraction.
    flip: whether the views are flipped with probability 0.5.
  Returns:
    dict of area [N, V, attempts] (fraction of the image area), aspect [N, V, attempts] (width / height),
    top, left [N, V] (uniform in [0, 1)) and flip [N, V] bool.
  """
  shape = tf.stack([num_images, CROP_ATTEMPTS])
  draws = {"area": [], "aspect": [], "top": [], "left": [], "flip": []}
  for view_seed in view_seeds:
    crop_seed, flip_seed = _split_seed(view_seed, 5)[:2]
    area_seed, ratio_seed, top_seed, left_seed = _split_seed(crop_seed, 4)
    draws["area"].append(tf.random.stateless_uniform(shape, area_seed, scale[0], scale[1]))
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    draws["aspect"].append(tf.exp(tf.random.stateless_uniform(shape, ratio_seed, log_ratio[0], log_ratio[1])))
    draws["top"].append(tf.random.stateless_uniform([num_images], top_seed))
    draws["left"].append(tf.random.stateless_uniform([num_images], left_seed))
    coins = tf.random.stateless_uniform([num_images], flip_seed) < 0.5
    draws["flip"].append(coins if flip else tf.zeros([num_images], tf.bool))
  if not view_seeds:  # no views in this group (e.g. pretrain.multicrop = 0)
    shapes = {"area": [num_images, 0, CROP_ATTEMPTS], "aspect": [num_images, 0, CROP_ATTEMPTS]}
    return {key: tf.zeros(shapes.get(key, [num_images, 0]), tf.bool if key == "flip" else tf.float32) for key in draws}
  return {key: tf.stack(values, axis=1) for key, values in draws.items()}


def crop_boxes(draws, height, width):
  """augment.sample_crop_boxes' boxes from the draws of one image (crop_draws), for its own size.

  Args:
    draws: one image's crop_draws: area, aspect [V, attempts]; top, left [V].
    height, width: the image's size (scalar int tensors).
  Returns:
    int32 [V, 4] of (top, left, crop_height, crop_width), the boxes sample_crop_boxes gives a batch of
    images of this size for the same seeds (the same function on the same draws, so bit for bit).
  """
  return augment.crop_boxes_from_draws(
    draws["area"], draws["aspect"], draws["top"], draws["left"], height, width, CROP_RATIO
  )


def resize_box(image, box, size):
  """One box of a uint8 [H, W, 3] image resized to size x size with PIL's bilinear filter, float32 in [0, 1].

  tf.image.resize's antialiased bilinear is PIL's filter (a triangle widened by the scale factor when
  shrinking, normalised over the pixels inside the box), the filter augment.augment_batch applies with
  per-image weight matrices. Its kernel runs over the few non-zero taps only: 2-3x faster per crop than a
  gather-based version of those matrices, which took a plain decode + crop + resize pipeline's speed down
  to 0.2x (benchmarks/stream_speed.py). It computes the weights in float32 rather than from integers: the
  two differ by at most 3e-6 of the [0, 1] range (tests/test_sources.py); a box of the output size is
  copied exactly.
  """
  crop = tf.cast(image[box[0] : box[0] + box[2], box[1] : box[1] + box[3]], tf.float32)
  return tf.image.resize(crop, [size, size], "bilinear", antialias=True) * (1.0 / 255.0)


_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
UNDECODABLE = "is not a JPEG or PNG image"  # in the assertion message a bad stream ends with (sources.py)


def _is_jpeg(encoded):
  return tf.strings.substr(encoded, 0, len(_JPEG_MAGIC)) == _JPEG_MAGIC


def _check_format(encoded, description):
  """Fails with the image's name unless the bytes start like a JPEG or a PNG."""
  known = _is_jpeg(encoded) | (tf.strings.substr(encoded, 0, len(_PNG_MAGIC)) == _PNG_MAGIC)
  return tf.debugging.Assert(known, [description, UNDECODABLE], name="check_image_format")


def decode_image(encoded, description):
  """uint8 [H, W, 3] of JPEG or PNG bytes, as PIL's Image.open(...).convert("RGB").

  JPEGs are decoded with libjpeg's accurate integer DCT, which PIL uses (TensorFlow's default, the fast
  DCT, is up to 5 levels off).
  """
  with tf.control_dependencies([_check_format(encoded, description)]):
    return tf.cond(
      _is_jpeg(encoded),
      lambda: tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE"),
      lambda: tf.io.decode_png(encoded, channels=3),
    )


def _decode_one_box(encoded, description, draws):
  """Decodes only the part of a JPEG its single view needs (the crop box, widened as _JPEG_BLOCK says).

  Returns (uint8 pixels, int32 [1, 4] box within them). A PNG is decoded whole.
  """

  def jpeg_window():
    shape = tf.image.extract_jpeg_shape(encoded)
    box = crop_boxes(draws, shape[0], shape[1])[0]
    low = tf.maximum(box[:2] // _JPEG_BLOCK * _JPEG_BLOCK - _JPEG_BLOCK, 0)
    high = tf.minimum(-(-(box[:2] + box[2:]) // _JPEG_BLOCK) * _JPEG_BLOCK + _JPEG_BLOCK, shape[:2])
    window = tf.concat([low, high - low], axis=0)
    pixels = tf.image.decode_and_crop_jpeg(encoded, window, channels=3, dct_method="INTEGER_ACCURATE")
    return pixels, tf.concat([box[:2] - low, box[2:]], axis=0)[None]

  def whole():
    pixels = tf.io.decode_png(encoded, channels=3)
    shape = tf.shape(pixels)
    return pixels, crop_boxes(draws, shape[0], shape[1])

  with tf.control_dependencies([_check_format(encoded, description)]):
    return tf.cond(_is_jpeg(encoded), jpeg_window, whole)


def _cut_views(encoded, description, draws, size):
  """The V views of one image: a list of float32 [size, size, 3] in [0, 1], cropped, resized and flipped."""
  num_views = draws["flip"].shape[0]
  if num_views == 1:
    pixels, boxes = _decode_one_box(encoded, description, draws)
  else:
    pixels = decode_image(encoded, description)
    shape = tf.shape(pixels)
    boxes = crop_boxes(draws, shape[0], shape[1])
  views = []
  for view in range(num_views):
    crop = resize_box(pixels, boxes[view], size)
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
    return _split_seed(_step_seed(seed, step, 1), num_seeds)

  def draw(step, indices):
    seeds = view_seeds(step)
    groups = tuple(
      keep(crop_draws(seeds[first : first + n], batch_size, scale, data.flip)) for first, n, _, scale in view_groups
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
  images, labeled_indices, labeled_labels, data, pretrain, *, start_step, total_steps, seed, replicas=ONE_DEVICE
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
  sampler = SupportSampler(**pretrain_supports(labeled_labels, p, seed, replicas.total))
  local_support = sampler.rows_per_replica

  def unlabeled_batches():
    for step in range(start_step, total_steps):
      yield step, unlabeled_indices(len(images), p.batch_size, step, seed)

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

  return round_robin(replica_dataset, replicas).prefetch(tf.data.AUTOTUNE)


def centre_box(height, width):
  """int32 [4]: the largest centred square of a height x width image, as (top, left, side, side)."""
  side = tf.minimum(height, width)
  return tf.stack([(height - side) // 2, (width - side) // 2, side, side])


def whole_image_loader(images, size):
  """index -> float32 [size, size, 3] in [0, 1]: the image's centred square, resized (in a tf.data map).

  Evaluation and fine-tuning use whole images (METHOD.md sections 6, 7); files of any shape become the
  encoder's size as Resize(shorter side) + CenterCrop would make them, in one PIL-bilinear resampling (an
  image already size x size is returned exactly).
  """

  def load(index):
    pixels = decode_image(images.read(index), images.describe(index))
    shape = tf.shape(pixels)
    return resize_box(pixels, centre_box(shape[0], shape[1]), size)

  return load


def stream_finetune_dataset(
  images, labeled_indices, labeled_labels, finetune, data, *, start_step, total_steps, seed, replicas=ONE_DEVICE
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
  sampler = SupportSampler(**finetune_supports(labeled_labels, f, seed, replicas.total))
  local_batch = sampler.rows_per_replica
  load = whole_image_loader(images, size)

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

  return round_robin(replica_dataset, replicas).prefetch(tf.data.AUTOTUNE)


def stream_eval_dataset(images, indices, batch_size, size, mean, std):
  """eval_dataset for images read from files: images[indices] in order, whole, at size x size, normalised."""
  dataset = tf.data.Dataset.from_tensor_slices(np.asarray(indices, np.int64))
  dataset = dataset.map(whole_image_loader(images, size), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  dataset = dataset.batch(batch_size).map(lambda x: augment.normalize(x, mean, std))
  return dataset.prefetch(tf.data.AUTOTUNE)
