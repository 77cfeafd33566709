"""Batched, stateless view augmentation: the CIFAR-10 and ImageNet recipes (METHOD.md sections 4, 10).

`augment_batch(images, seed, size, scale, spec)` makes one view of every image of a batch, with the
settings of an `AugmentSpec` (built once from the config's `data` section by `AugmentSpec.from_config`).
For crops cut elsewhere (images read from files) `colour_draws` makes its colour draws and `apply_colour`
its colour stage (with the same seed: augment_batch's pixels for the same crops), and `crop_draws` /
`crop_boxes` its crop draws for images whose size is known only once decoded. `rows` (sampling.Rows) lets
one replica augment its rows of a global batch exactly as the whole batch would.

Every op transforms a whole batch at once, with its own random draws for each
image. Per-image ops (tf.map_fn, or Model Garden's `official.vision.ops.augment`
functions, which take one image) run dozens of small kernels per image and
cannot feed the trainer: PAWS needs 8 views of 256 images per step, and the
input pipeline must reach >= 20 000 crops/s on 2 CPU cores. `augment_batch`
additionally runs the pixel work as one XLA-compiled function.

The ops follow the reference, which works on PIL uint8 images: crops are
resized with PIL's bilinear filter (a triangle widened by the scale factor when
shrinking, i.e. antialiased), Solarize draws a new threshold in [0, 256)
for each image it solarizes, and the ImageNet recipe's RandomGrayscale and
GaussianBlur reproduce PIL's convert("L") and ImageFilter.GaussianBlur,
including their rounding to uint8.

Randomness is stateless: each function takes a `seed` (int32 or int64 tensor
of shape [2]) and derives sub-seeds with `stateless_split`, so a stream is
reproducible, resumable and independent of tf.data parallelism, and the same
seed gives the same bits eagerly, in tf.function and in tf.data.

Images are float32 in [0, 1] between ops (uint8 is accepted where noted).
"""

from collections.abc import Callable, Sequence
import dataclasses
import math

from ml_collections import ConfigDict
import tensorflow as tf

from utils.data.sampling import Rows

try:
  # Not exported under tf.*: an internal module that may move. It is only a
  # fusion hint (see _xla_fence), so without it the pixels stay the same.
  from tensorflow.compiler.tf2xla.python import xla as _xla

  _optimization_barrier = _xla.optimization_barrier
except (ImportError, AttributeError):
  _optimization_barrier = None


# RandomResizedCrop's aspect ratio range (width / height), as the reference's torchvision default.
CROP_RATIO = (3 / 4, 4 / 3)


# ITU-R 601 luma weights, as PIL's convert("L") and torchvision use.
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)


# Constant divisors are written as multiplications by their reciprocal: XLA
# and Grappler (graph mode) rewrite x / c that way but eager mode does not,
# so an explicit product gives the same bits in every execution mode.
_INVERSE_255 = 1.0 / 255.0


def _unfenced(images):
  return images


def _xla_fence(images):
  """Makes XLA materialise `images` instead of fusing its computation into
  every consumer. A colour pass feeds both a per-image mean and a per-pixel
  loop; without the fence XLA recomputes the whole chain of earlier passes
  inside each, which doubles the cost of the colour jitter. Only valid inside
  an XLA-compiled function; the identity if the barrier op is unavailable.
  """
  if _optimization_barrier is None:
    return images
  return _optimization_barrier(images)[0]


def _split(seed, count):
  """Returns `count` independent seeds ([2] tensors) derived from `seed`."""
  return tf.unstack(tf.random.experimental.stateless_split(seed, count))


def _to_float(images):
  """uint8 0..255 or float 0..1 -> float32 0..1."""
  if images.dtype == tf.uint8:
    return tf.cast(images, tf.float32) * _INVERSE_255
  return tf.cast(images, tf.float32)


def sample_crop_boxes(
  seed: tf.Tensor,
  num_images: int | tf.Tensor,
  height: int | tf.Tensor,
  width: int | tf.Tensor,
  scale: Sequence[float],
  ratio: Sequence[float],
  attempts: int = 10,
) -> tf.Tensor:
  """Samples RandomResizedCrop boxes, torchvision semantics (METHOD.md section 4, 9.6).

  All `attempts` tries are drawn at once and the first valid one is kept;
  images without a valid try fall back to torchvision's centre crop.

  Args:
    seed: int32/int64 tensor of shape [2].
    num_images: number of boxes to draw.
    height, width: image size in pixels (int or scalar tensor).
    scale: (min, max) fraction of the image AREA covered by the crop.
    ratio: (min, max) aspect ratio width / height of the crop.
    attempts: number of tries per image before the fallback.

  Returns:
    int32 tensor [num_images, 4] of (top, left, crop_height, crop_width).
  """
  area_seed, ratio_seed, top_seed, left_seed = _split(seed, 4)
  shape = tf.stack([num_images, attempts])
  area_fraction = tf.random.stateless_uniform(shape, area_seed, scale[0], scale[1])
  aspect = tf.exp(tf.random.stateless_uniform(shape, ratio_seed, math.log(ratio[0]), math.log(ratio[1])))
  top = tf.random.stateless_uniform([num_images], top_seed)
  left = tf.random.stateless_uniform([num_images], left_seed)
  return crop_boxes_from_draws(area_fraction, aspect, top, left, height, width, ratio)


def crop_boxes_from_draws(
  area_fraction: tf.Tensor,
  aspect: tf.Tensor,
  top: tf.Tensor,
  left: tf.Tensor,
  height: int | tf.Tensor,
  width: int | tf.Tensor,
  ratio: Sequence[float],
) -> tf.Tensor:
  """RandomResizedCrop boxes from their random draws, for images of one size.

  The arithmetic half of sample_crop_boxes, shared with the streamed pipeline, which draws before it
  knows an image's size (crop_draws) and makes the boxes once the image is decoded.

  Args:
    area_fraction, aspect: float32 [N, attempts]: crop area as a fraction of the image's, width / height.
    top, left: float32 [N], uniform in [0, 1): the offsets within the free range.
    height, width: image size in pixels (int or scalar tensor).
    ratio: (min, max) aspect ratio, for the centre-crop fallback.

  Returns:
    int32 tensor [N, 4] of (top, left, crop_height, crop_width).
  """
  attempts = tf.shape(area_fraction)[1]
  height_float = tf.cast(height, tf.float32)
  width_float = tf.cast(width, tf.float32)
  area = height_float * width_float * area_fraction
  # tf.round rounds half to even, like Python's round() in torchvision.
  crop_widths = tf.round(tf.sqrt(area * aspect))
  crop_heights = tf.round(tf.sqrt(area / aspect))
  valid = (crop_widths > 0) & (crop_widths <= width_float) & (crop_heights > 0) & (crop_heights <= height_float)
  # Index of the first valid attempt (tf.argmax does not promise the first
  # of tied maxima); `attempts` when there is none.
  first_valid = tf.reduce_min(tf.where(valid, tf.range(attempts)[None, :], attempts), axis=1)
  any_valid = first_valid < attempts
  first_valid = tf.minimum(first_valid, attempts - 1)
  crop_height = tf.gather(crop_heights, first_valid, batch_dims=1)
  crop_width = tf.gather(crop_widths, first_valid, batch_dims=1)

  # Fallback: the whole image, with its aspect ratio clamped into `ratio`.
  image_ratio = width_float / height_float
  min_ratio, max_ratio = min(ratio), max(ratio)
  fallback_height = tf.where(image_ratio < min_ratio, tf.round(width_float * (1.0 / min_ratio)), height_float)
  fallback_width = tf.where(image_ratio > max_ratio, tf.round(height_float * max_ratio), width_float)
  crop_height = tf.where(any_valid, crop_height, fallback_height)
  crop_width = tf.where(any_valid, crop_width, fallback_width)

  # Uniform integer offsets in 0..H-h; floor(u * count) is uniform over count.
  top = tf.floor(top * (height_float - crop_height + 1))
  left = tf.floor(left * (width_float - crop_width + 1))
  top = tf.where(any_valid, tf.minimum(top, height_float - crop_height), tf.floor((height_float - crop_height) * 0.5))
  left = tf.where(any_valid, tf.minimum(left, width_float - crop_width), tf.floor((width_float - crop_width) * 0.5))
  return tf.cast(tf.stack([top, left, crop_height, crop_width], axis=1), tf.int32)


def _filter_weights(start, length, size, extent):
  """PIL's bilinear resampling weights along one axis, for a batch of crops.

  PIL cuts the crop out, then resamples it with a triangle filter: output
  pixel i is centred at input position (i + 0.5) * scale, scale = length /
  size, and input pixel j of the crop gets weight
  max(0, 1 - |j + 0.5 - centre| / max(scale, 1)), normalised to sum 1. When
  shrinking, the triangle widens with the scale (antialiasing: every input
  pixel contributes); when enlarging, this is plain 2-tap bilinear with
  half-pixel centres. Pixels outside the crop get weight 0.

  Multiplied by 2 size, all distances are integers, so the weights are
  computed exactly up to the final normalisation: a box of the output size
  gets one-hot weights and copies its pixels in every execution mode. Every
  output centre lies inside the crop, so no row sums to 0.

  Args:
    start, length: int32 [N] crop offset and extent in pixels.
    size: output extent (Python int).
    extent: input extent (int or scalar int32 tensor).

  Returns:
    float32 [N, size, extent]: row i holds the weights of output pixel i.
  """
  start = start[:, None, None]
  length = length[:, None, None]
  pixel = tf.range(extent)[None, None, :]
  # 2 size (j + 0.5 - start) - 2 size (i + 0.5) scale and 2 size max(scale, 1).
  distance = tf.abs(size * (2 * (pixel - start) + 1) - length * (2 * tf.range(size)[None, :, None] + 1))
  weights = tf.maximum(2 * tf.maximum(length, size) - distance, 0)
  weights = tf.where((pixel >= start) & (pixel < start + length), weights, 0)
  weights = tf.cast(weights, tf.float32)
  return weights / tf.reduce_sum(weights, axis=2, keepdims=True)


def _resize_boxes(images, boxes, size, flip=None):
  """Cuts boxes out of images, resizes them to size x size as PIL's bilinear.

  The reference's RandomResizedCrop (METHOD.md section 4) runs PIL's
  img.crop(box).resize((size, size), BILINEAR). Its filter is separable: one
  weight matrix per image and axis, applied as two batched matrix products
  (small: [N, 18, 32] for a small view; faster on CPU than the gathers of a
  2-tap filter). PIL rounds to uint8 after each pass, this keeps floats: on
  uint8 input the two differ by at most 1 grey level.
  tf.image.crop_and_resize is not an option: it samples 2 taps without
  antialiasing, fills samples outside [0, H-1] with a constant and reads
  pixels beyond the crop.

  Args:
    images: [N, H, W, C] uint8 or float.
    boxes: int32 [N, 4] of (top, left, crop_height, crop_width).
    size: output side in pixels (Python int).
    flip: optional bool [N]; these outputs are mirrored left-right (free:
      the column weights are reversed along their output axis).

  Returns:
    float32 [N, size, size, C] on the input's scale.
  """
  boxes = tf.cast(boxes, tf.int32)
  shape = tf.shape(images)
  row_weights = _filter_weights(boxes[:, 0], boxes[:, 2], size, shape[1])
  column_weights = _filter_weights(boxes[:, 1], boxes[:, 3], size, shape[2])
  if flip is not None:
    column_weights = tf.where(flip[:, None, None], tf.reverse(column_weights, axis=[1]), column_weights)
  rows = tf.einsum("nih,nhwc->niwc", row_weights, tf.cast(images, tf.float32))
  return tf.einsum("niwc,nkw->nikc", rows, column_weights)


def _crop_to_unit_range(images, boxes, size, flip=None):
  """_resize_boxes with float32 [0, 1] output for uint8 or [0, 1] input."""
  resized = _resize_boxes(images, boxes, size, flip)
  if images.dtype == tf.uint8:
    # Scale after resampling: an unscaled box then matches _to_float exactly.
    resized = resized * _INVERSE_255
  return resized


def _coins(seed, num_images, prob):
  """Boolean [num_images], each True with probability `prob`."""
  return tf.random.stateless_uniform([num_images], seed) < prob


def _select(mask, new_images, images):
  """Per-image choice between two rank-4 batches."""
  return tf.where(mask[:, None, None, None], new_images, images)


def draw_rows(num_images: int | tf.Tensor, rows: Rows | None) -> tuple[int | tf.Tensor, Callable]:
  """(number of images to draw for, function keeping this batch's rows of every draw).

  rows: the images are these rows of a batch of rows.total (sampling.Rows), as on one replica of a global
  batch; the draws are made for the whole batch and these rows kept, so a replica's images are augmented
  exactly as in the global batch. None: the num_images images are the whole batch.
  """
  if rows is None:
    return num_images, lambda draws: draws
  return rows.total, lambda draws: tf.nest.map_structure(
    lambda t: None if t is None else t[rows.start : rows.start + rows.count], draws
  )


def random_flip(images: tf.Tensor, seed: tf.Tensor, prob: float = 0.5, rows: Rows | None = None) -> tf.Tensor:
  """Flips each image left-right with probability `prob` (METHOD.md section 4).

  Args:
    images: [N, H, W, C] tensor.
    seed: int32/int64 tensor of shape [2].
    prob: flip probability per image.
    rows: optional sampling.Rows: images are these rows of a batch of rows.total (see draw_rows).

  Returns:
    tensor like `images`.
  """
  num_draws, keep = draw_rows(tf.shape(images)[0], rows)
  flip = keep(_coins(seed, num_draws, prob))
  return _select(flip, tf.reverse(images, axis=[2]), images)


def _sample_jitter(seed, num_images, brightness, contrast, saturation, hue, prob):
  """Per-image ColorJitter parameters, laid out as passes for _jitter.

  A uniform permutation of the four ops equals a uniform order of the three
  blends (brightness 0, contrast 1, saturation 2) times a uniform slot 0..3
  for hue (3! * 4 = 24 outcomes). So the blends run as 3 passes before one
  shared hue rotation and 3 after, each image active in exactly 3 of them:
  one hue rotation per batch instead of one per slot, and no per-image
  branching.

  Returns:
    dict of apply [N] bool; factor, contrast, saturation [N, passes] float32
    (factor 1 = inactive pass, exactly the identity); hue_shift [N] float32
    (fraction of a turn) if hue > 0.
  """
  (apply_seed, factor_seed, hue_seed, order_seed, position_seed) = _split(seed, 5)
  strengths = tf.constant([brightness, contrast, saturation], tf.float32)
  low = tf.maximum(0.0, 1.0 - strengths)
  factors = low + (1.0 + strengths - low) * tf.random.stateless_uniform(tf.stack([num_images, 3]), factor_seed)
  order = tf.argsort(tf.random.stateless_uniform(tf.stack([num_images, 3]), order_seed), axis=1)
  num_blends = 3 if (brightness > 0 or contrast > 0 or saturation > 0) else 0
  order = order[:, :num_blends]
  # Slot s of image n runs blend order[n, s] with factor factors[n, order].
  slot_factors = tf.gather(factors, order, batch_dims=1)
  active = tf.ones_like(slot_factors, tf.bool)
  parameters = {"apply": _coins(apply_seed, num_images, prob)}
  if hue > 0:
    parameters["hue_shift"] = tf.random.stateless_uniform([num_images], hue_seed, -float(hue), float(hue))
    hue_slot = tf.random.stateless_uniform(tf.stack([num_images, 1]), position_seed, 0, 4, dtype=tf.int32)
    before_hue = tf.range(num_blends)[None, :] < hue_slot
    order = tf.concat([order, order], axis=1)
    slot_factors = tf.concat([slot_factors, slot_factors], axis=1)
    active = tf.concat([before_hue, ~before_hue], axis=1)
  parameters["factor"] = tf.where(active, slot_factors, 1.0)
  parameters["contrast"] = tf.cast(order == 1, tf.float32)
  parameters["saturation"] = tf.cast(order == 2, tf.float32)
  return parameters


def _per_image(values):
  """[N] -> [N, 1, 1, 1] for broadcasting against a batch."""
  return values[:, None, None, None]


def _blend(images, factor, contrast, saturation):
  """Brightness, contrast or saturation per image, as torchvision's blend.

  All three are clamp(f * image + (1 - f) * target) with target black, the
  image's mean gray level or the pixel's gray level; `contrast` and
  `saturation` ([N], 0 or 1) pick the target.
  """
  gray = _GRAY_WEIGHTS[0] * images[..., 0:1] + _GRAY_WEIGHTS[1] * images[..., 1:2] + _GRAY_WEIGHTS[2] * images[..., 2:3]
  mean_gray = tf.reduce_mean(gray, axis=[1, 2, 3], keepdims=True)
  factor = _per_image(factor)
  target = _per_image(contrast) * mean_gray + _per_image(saturation) * gray
  return tf.clip_by_value(factor * images + (1.0 - factor) * target, 0.0, 1.0)


def _rotate_hue(images, shifts):
  """Adds `shifts` [N] (fractions of a turn) to the HSV hue of each image.

  Same result as tf.image.rgb_to_hsv -> shift -> hsv_to_rgb, written out
  directly: a rotation keeps each pixel's max (V) and chroma (max - min), so
  only the hue needs computing. One fused loop instead of two conversions;
  the output stays within [min, max] of each pixel, so needs no clipping.
  """
  red, green, blue = images[..., 0], images[..., 1], images[..., 2]
  value = tf.maximum(tf.maximum(red, green), blue)
  chroma = value - tf.minimum(tf.minimum(red, green), blue)
  safe_chroma = tf.where(chroma > 0, chroma, 1.0)
  # Hue in sextants, [0, 6); ties resolved red, green, blue as in TF's op.
  hue = tf.where(
    value == red,
    (green - blue) / safe_chroma,
    tf.where(value == green, (blue - red) / safe_chroma + 2.0, (red - green) / safe_chroma + 4.0),
  )
  hue += 6.0 * shifts[:, None, None]
  hue -= 6.0 * tf.floor(hue * (1.0 / 6.0))
  # Fraction of the chroma kept by each channel at this hue.
  red_weight = tf.clip_by_value(tf.abs(hue - 3.0) - 1.0, 0.0, 1.0)
  green_weight = tf.clip_by_value(2.0 - tf.abs(hue - 2.0), 0.0, 1.0)
  blue_weight = tf.clip_by_value(2.0 - tf.abs(hue - 4.0), 0.0, 1.0)
  return tf.stack(
    [value - chroma * (1.0 - red_weight), value - chroma * (1.0 - green_weight), value - chroma * (1.0 - blue_weight)],
    axis=-1,
  )


def _jitter(images, parameters, fence=_unfenced):
  """Applies _sample_jitter's parameters to float images in [0, 1]."""

  def blend_pass(images, index):
    return fence(
      _blend(
        images, parameters["factor"][:, index], parameters["contrast"][:, index], parameters["saturation"][:, index]
      )
    )

  rotate = "hue_shift" in parameters
  num_passes = parameters["factor"].shape[1]
  passes_before_hue = num_passes // 2 if rotate else num_passes
  jittered = images
  for index in range(passes_before_hue):
    jittered = blend_pass(jittered, index)
  if rotate:
    jittered = fence(_rotate_hue(jittered, parameters["hue_shift"]))
  for index in range(passes_before_hue, num_passes):
    jittered = blend_pass(jittered, index)
  return _select(parameters["apply"], jittered, images)


def _sample_solarize(seed, num_images, prob):
  """Per-image Solarize thresholds, on the [0, 1] scale (METHOD.md section 4).

  The reference solarizes an image with probability `prob`, each time with a
  new threshold t ~ U[0, 256): PIL's ImageOps.solarize inverts the levels
  i >= t, that is i >= ceil(t), a level uniform on 1..256 (t = 0 has
  probability 0; 256 inverts nothing). The level is drawn directly, and the
  comparison is made at the midpoint below it, (level - 0.5) / 255: a pixel
  is inverted iff round(255 x) >= level, so quantised inputs match PIL
  however they were scaled to [0, 1]. Images not selected get threshold 2,
  above every pixel: one comparison per pixel covers both cases.

  Returns:
    float32 [num_images].
  """
  apply_seed, level_seed = _split(seed, 2)
  level = tf.random.stateless_uniform([num_images], level_seed, 1, 257, dtype=tf.int32)
  threshold = (tf.cast(level, tf.float32) - 0.5) * _INVERSE_255
  return tf.where(_coins(apply_seed, num_images, prob), threshold, 2.0)


def _solarize(images, thresholds):
  """x -> 1 - x where x >= the image's threshold ([N], from _sample_solarize)."""
  return tf.where(images >= _per_image(thresholds), 1.0 - images, images)


def _equalize_all(images):
  """PIL ImageOps.equalize on every channel of float [M, H, W, C] images."""
  shape = tf.shape(images)
  # Static sizes where known: inside an XLA-compiled train step the histogram's length must be a constant.
  num_rows = (images.shape[0] or shape[0]) * (images.shape[3] or shape[3])
  levels = tf.cast(tf.round(images * 255.0), tf.int32)
  # One 256-bin histogram per (image, channel) row: offset the levels by
  # 256 * row and count them all with one bincount (the raw op: tf.math.bincount derives its length from the
  # data's maximum, which XLA cannot fold to a constant).
  bins = levels + tf.reshape(tf.range(num_rows) * 256, [shape[0], 1, 1, -1])
  counts = tf.raw_ops.DenseBincount(
    input=tf.reshape(bins, [-1]), size=num_rows * 256, weights=tf.zeros([0], tf.int32), binary_output=False
  )
  histogram = tf.reshape(counts, [num_rows, 256])
  last_nonzero = tf.reduce_max(tf.where(histogram > 0, tf.range(256)[None, :], -1), axis=1)
  last_count = tf.gather(histogram, last_nonzero, batch_dims=1)
  step = (tf.reduce_sum(histogram, axis=1) - last_count) // 255
  safe_step = tf.maximum(step, 1)[:, None]
  lut = (tf.cumsum(histogram, axis=1) + safe_step // 2) // safe_step
  lut = tf.clip_by_value(tf.concat([tf.zeros_like(lut[:, :1]), lut[:, :-1]], axis=1), 0, 255)
  equalized = tf.cast(tf.gather(tf.reshape(lut, [-1]), bins), tf.float32) * _INVERSE_255
  # PIL leaves a channel with step 0 (nearly constant) unchanged.
  keep = tf.reshape(step == 0, [shape[0], 1, 1, -1])
  return tf.where(keep, images, equalized)


def _equalize_selected(images, mask):
  """Indices [M, 1] of the images selected by `mask` and those images equalized.

  Only the selected images (p = 0.2 in PAWS) are gathered and equalized: the
  per-pixel histogram and look-up are the most expensive part of a view.
  Plain TensorFlow ops, since the number selected is data-dependent.
  """
  indices = tf.where(mask)
  return indices, _equalize_all(tf.gather_nd(images, indices))


# PIL's convert("L"): L = R 299/1000 + G 587/1000 + B 114/1000 with the weights
# rounded to 16-bit fixed point, then rounded half up. An exhaustive comparison
# over all 2^24 colours matches these integer weights exactly; the decimal
# weights themselves round differently for 9 040 colours.
_LUMA_WEIGHTS_16BIT = (19595, 38470, 7471)


# PIL's GaussianBlur(radius) runs this many extended box filters along each
# axis, all horizontal passes before the vertical ones.
_BLUR_PASSES = 3


# Its box weights are fixed-point fractions of 2^24 (see _box_weights).
_BLUR_ONE = 2.0**24


def _levels(images):
  """Float [0, 1] -> grey levels 0..255 as whole float32 numbers (PIL works on uint8)."""
  return tf.floor(images * 255.0 + 0.5)


def _grayscale(images):
  """PIL's convert("L") replicated to 3 channels, on float [N, H, W, 3] images in [0, 1].

  The images are rounded to grey levels first, as PIL holds them. Every
  intermediate is a whole number below 2^24, so float32 computes PIL's integer
  arithmetic exactly: outputs equal PIL's on every uint8 input.
  """
  levels = _levels(images)
  weighted = (
    _LUMA_WEIGHTS_16BIT[0] * levels[..., 0:1]
    + _LUMA_WEIGHTS_16BIT[1] * levels[..., 1:2]
    + _LUMA_WEIGHTS_16BIT[2] * levels[..., 2:3]
  )
  luma = tf.floor((weighted + 32768.0) * (1.0 / 65536.0))
  return tf.concat([luma, luma, luma], axis=-1) * _INVERSE_255


def _box_radius(radii):
  """The extended box radius l + alpha of one pass, for Gaussians of std `radii` (PIL's radius).

  Extended box filtering (Gwosdek et al., SSVM 2011, which Pillow's
  documentation cites): `_BLUR_PASSES` passes of a box of variance
  radius^2 / passes. A box of integer radius l has 2 l + 1 taps of weight 1;
  the extension adds taps of weight alpha in [0, 1) at +-(l + 1), with l and
  alpha solving for the variance exactly. Works on floats or tensors.
  """
  variance = radii * radii * (1.0 / _BLUR_PASSES)
  inner = 0.5 * (12.0 * variance + 1.0) ** 0.5 - 0.5
  inner = math.floor(inner) if isinstance(inner, float) else tf.floor(inner)
  extension = (2.0 * inner + 1.0) * (inner * (inner + 1.0) - 3.0 * variance) / (6.0 * (variance - (inner + 1.0) ** 2))
  return inner + extension


def _blur_taps(max_radius):
  """Taps of one box pass for Gaussian radii up to `max_radius` (Python float): 2 (l + 1) + 1.

  The margin covers a float32 box radius rounded up to the next integer.
  """
  return 2 * (math.floor(_box_radius(float(max_radius)) + 1e-4) + 1) + 1


def _box_weights(radii, taps):
  """Per-image fixed-point weights of one extended box pass, as PIL computes them.

  Derived by comparing with Pillow (one-row images, where the vertical passes
  do nothing): with box radius R = l + alpha (float32), the inner taps weigh
  w = trunc(2^24 / (2 R + 1)) computed in float32, the two extension taps
  weigh (2^24 - (2 l + 1) w) // 2, and each output is
  (sum of weight x level + 2^23) >> 24. This reproduces Pillow's output
  exactly, including its rounding of near-ties, which exact weights
  (1 / (2 R + 1), alpha / (2 R + 1)) do not (up to 3 levels off at radius 1).

  Args:
    radii: float32 [N], the Gaussian's standard deviation per image.
    taps: odd Python int, from _blur_taps.

  Returns:
    float32 [N, taps], whole numbers summing to at most 2^24.
  """
  box_radius = tf.cast(_box_radius(tf.cast(radii, tf.float64)), tf.float32)
  inner = tf.floor(box_radius)
  inner_weight = tf.floor(_BLUR_ONE / (2.0 * box_radius + 1.0))
  edge_weight = tf.floor((_BLUR_ONE - (2.0 * inner + 1.0) * inner_weight) * 0.5)
  half_width = (taps - 1) // 2
  offsets = tf.abs(tf.range(-half_width, half_width + 1, dtype=tf.float32))[None, :]
  inner, inner_weight, edge_weight = inner[:, None], inner_weight[:, None], edge_weight[:, None]
  return tf.where(offsets <= inner, inner_weight, tf.where(offsets == inner + 1.0, edge_weight, 0.0))


def _low_bits(taps):
  """Bits of the weights' low part: keeps every sum in _box_pass a whole number below 2^24."""
  return math.floor(math.log2(2.0**23 / (255 * taps)))


def _blur_parameters(radii, apply, max_radius):
  """GaussianBlur parameters for given radii [N] and coins [N] (radii <= max_radius, a Python float).

  Returns:
    dict of apply [N] bool, radius [N] float32, and the weights of
    _box_weights split as high * 2^b + low (b = _low_bits; high, low float32
    [N, taps]).
  """
  taps = _blur_taps(max_radius)
  weights = _box_weights(radii, taps)
  unit = 2.0 ** _low_bits(taps)
  high = tf.floor(weights * (1.0 / unit))
  return {"apply": apply, "radius": radii, "high": high, "low": weights - high * unit}


def _sample_blur(seed, num_images, prob, radius):
  """Per-image GaussianBlur coins and radii ~ U[radius[0], radius[1]), as _blur_parameters.

  Computed outside the compiled pixel function, so XLA does not recompute
  them for every pixel.
  """
  apply_seed, radius_seed = _split(seed, 2)
  radii = tf.random.stateless_uniform([num_images], radius_seed, radius[0], radius[1])
  return _blur_parameters(radii, _coins(apply_seed, num_images, prob), radius[1])


def _shifted(images, axis, start, length):
  """images[:, start:start + length] along `axis` (1 rows, 2 columns)."""
  begin = [0, 0, 0, 0]
  begin[axis] = start
  size = [-1, -1, -1, -1]
  size[axis] = length
  return tf.slice(images, begin, size)


def _box_pass(levels, high, low, axis, fence=_unfenced):
  """One extended box pass along `axis` on grey levels, with PIL's fixed-point rounding.

  The image is extended by repeating its edge pixels (PIL clamps at the
  border). The extended image is fenced: XLA would otherwise evaluate the
  concatenation, with its branches, inside the loop for every tap of every
  output (about 30 times slower at 224 px). PIL's sum of weight x level reaches 2^32, beyond float32's exact
  integers (2^24), so the weights come split into high * 2^b + low: both
  partial sums stay exact, and so does
  (sum + 2^23) >> 24 = floor((high sum + floor((low sum + 2^23) / 2^b)) / 2^(24 - b)).
  """
  taps = high.shape[1]
  unit_bits = _low_bits(taps)
  half_width = (taps - 1) // 2
  length = tf.shape(levels)[axis]
  first = _shifted(levels, axis, 0, 1)
  last = _shifted(levels, axis, length - 1, 1)
  padded = fence(tf.concat([first] * half_width + [levels] + [last] * half_width, axis=axis))
  windows = [_shifted(padded, axis, tap, length) for tap in range(taps)]
  high_sum = tf.add_n([_per_image(high[:, tap]) * window for tap, window in enumerate(windows)])
  low_sum = tf.add_n([_per_image(low[:, tap]) * window for tap, window in enumerate(windows)])
  carry = tf.floor((low_sum + 2.0**23) * 2.0**-unit_bits)
  return tf.floor((high_sum + carry) * 2.0 ** (unit_bits - 24))


def _gaussian_blur(images, parameters, fence=_unfenced):
  """PIL's ImageFilter.GaussianBlur on float [N, H, W, C] images in [0, 1], per-image radius.

  `_BLUR_PASSES` horizontal then as many vertical extended box passes with
  the weights of _sample_blur, on grey levels: the images are rounded to
  levels first and every pass rounds like PIL, so uint8 inputs give PIL's
  output exactly. Images whose coin is False are returned unchanged.
  """
  levels = _levels(images)
  for axis in (2, 1):
    for _ in range(_BLUR_PASSES):
      levels = _box_pass(levels, parameters["high"], parameters["low"], axis, fence)
  return _select(parameters["apply"], levels * _INVERSE_255, images)


def normalize(images: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
  """(x - mean) / std per channel (METHOD.md section 4).

  Args:
    images: uint8 0..255 (scaled by 1/255 first) or float in [0, 1].
    mean, std: per-channel sequences.

  Returns:
    float32 tensor of the same shape.
  """
  inverse_std = [1.0 / value for value in std]
  return (_to_float(images) - tf.constant(mean, tf.float32)) * tf.constant(inverse_std, tf.float32)


# XLA fuses the ~100 elementwise ops of a view into a few loops. Run op by op,
# TensorFlow's CPU kernels (broadcasting selects and binary ops are slow) gave
# only about 2 000 crops/s on 2 cores. The random parameters are drawn outside
# the compiled function: inside it, XLA fuses the per-image Philox draws into
# every per-pixel loop and recomputes them for each pixel.
def _colour_views(views, colour, mean, std):
  """Jitter, grayscale, blur, solarize of fenced [0, 1] views, inside an XLA-compiled function.

  colour: _sample_colour's (jitter parameters, solarize thresholds, grayscale coins, blur parameters), None
  for an op that is off. Returns the [0, 1] and the normalised views.
  """
  jitter, solarize_thresholds, grayscale, blur = colour
  if jitter is not None:
    views = _jitter(views, jitter, _xla_fence)
  if grayscale is not None:
    views = _select(grayscale, _grayscale(views), views)
  if blur is not None:
    views = _gaussian_blur(views, blur, _xla_fence)
  if solarize_thresholds is not None:
    views = _solarize(views, solarize_thresholds)
  return views, normalize(views, mean, std)


@tf.function(jit_compile=True, autograph=False)
def _augment_pixels(images, boxes, flip, colour, size, mean, std):
  """Crop, flip, then _colour_views' colour ops (colour: None for none); the [0, 1] and normalised views."""
  views = _xla_fence(_crop_to_unit_range(images, boxes, size, flip))
  return _colour_views(views, colour or (None,) * 4, mean, std)


@dataclasses.dataclass(frozen=True, slots=True)
class AugmentSpec:
  """The view augmentation of the config's `data` section, every op's setting (METHOD.md section 4).

  The CIFAR-10 recipe uses jitter, solarize and equalize; the ImageNet recipe (strength 1) jitter, grayscale
  and blur. An op whose probability or strength is 0 stays out of the graph. Frozen and slotted: tf.function
  takes it as one hashable constant, compared by value, so equal specs share their traces.

  Attributes:
    flip: whether to flip images with probability 0.5.
    color_jitter_prob, color_jitter_strength: ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s) with this probability.
    solarize_prob, equalize_prob, grayscale_prob, blur_prob: per-image probabilities.
    blur_radius: (min, max) of the blur radius (PIL's radius, the Gaussian's standard deviation), 0 < min <= max.
    mean, std: per-channel normalisation constants.
  """

  flip: bool
  color_jitter_prob: float
  color_jitter_strength: float
  solarize_prob: float
  equalize_prob: float
  grayscale_prob: float
  blur_prob: float
  blur_radius: tuple[float, float]
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def __post_init__(self):
    # Plain Python values, so equal settings give equal (and equally hashed) specs whatever types they came in.
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.type is bool:
        value = bool(value)
      elif field.type is float:
        value = float(value)
      else:
        value = tuple(float(item) for item in value)
      object.__setattr__(self, field.name, value)

  @classmethod
  def from_config(cls, data: ConfigDict) -> "AugmentSpec":
    """The spec of the config's `data` section (config.py holds every field's value)."""
    return cls(**{field.name: data[field.name] for field in dataclasses.fields(cls)})

  def crop_and_flip(self) -> "AugmentSpec":
    """Only the crop, the flip and the normalisation: the classifier fine-tuning's views (no colour op)."""
    return dataclasses.replace(
      self,
      color_jitter_prob=0.0,
      color_jitter_strength=0.0,
      solarize_prob=0.0,
      equalize_prob=0.0,
      grayscale_prob=0.0,
      blur_prob=0.0,
    )


def augment_batch(
  images: tf.Tensor,
  seed: tf.Tensor,
  size: int,
  scale: Sequence[float],
  spec: AugmentSpec,
  *,
  ratio: Sequence[float] = CROP_RATIO,
  rows: Rows | None = None,
) -> tf.Tensor:
  """One PAWS view of every image in a batch (METHOD.md section 4).

  RandomResizedCrop (PIL bilinear resize) -> horizontal flip (p = 0.5) ->
  ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s) with p = color_jitter_prob ->
  RandomGrayscale (PIL convert("L")) -> GaussianBlur (PIL, radius ~
  U[blur_radius] per image) -> Solarize (threshold ~ U[0, 256) per image) ->
  Equalize -> Normalize, with the settings of `spec`. The pixel work runs as
  one XLA-compiled function (compiled once per input shape and configuration).

  Args:
    images: [N, H, W, 3] uint8 or float in [0, 1].
    seed: int32/int64 tensor of shape [2].
    size: output side in pixels.
    scale: (min, max) crop area fraction.
    spec: the AugmentSpec (AugmentSpec.from_config(config.data)).
    ratio: (min, max) crop aspect ratio.
    rows: optional sampling.Rows: `images` are these rows of a batch of rows.total (one replica's share);
      their draws are those of the whole batch, so the views equal those rows of the whole batch's views.

  Returns:
    float32 [N, size, size, 3], normalised.
  """
  return _augment_batch_graph(images, seed, int(size), tuple(scale), tuple(ratio), spec, _hashable(rows))


def _hashable(rows):
  return None if rows is None else Rows(*(int(value) for value in rows))


def _sample_colour(seed, num_images, spec):
  """The per-image colour draws of one view, from sub-seeds 2 and 3 of 5 (and 5, 6 of 7) of its seed.

  Shared by augment_batch and colour_draws, so both make the same draws for the same seed.
  Returns (jitter parameters, solarize thresholds, grayscale coins, blur parameters); None for an op that
  is off, which then stays out of the graph.
  """
  _, _, jitter_seed, solarize_seed, _ = _split(seed, 5)
  jitter = None
  if spec.color_jitter_prob > 0 and spec.color_jitter_strength > 0:
    strength = 0.8 * spec.color_jitter_strength
    jitter = _sample_jitter(
      jitter_seed, num_images, strength, strength, strength, 0.2 * spec.color_jitter_strength, spec.color_jitter_prob
    )
  solarize = spec.solarize_prob
  solarize_thresholds = _sample_solarize(solarize_seed, num_images, solarize) if solarize > 0 else None
  grayscale = blur = None
  if spec.grayscale_prob > 0 or spec.blur_prob > 0:
    # Two more sub-seeds, drawn only here so that settings without these ops
    # keep their graph and their bits.
    grayscale_seed, blur_seed = _split(seed, 7)[5:]
    if spec.grayscale_prob > 0:
      grayscale = _coins(grayscale_seed, num_images, spec.grayscale_prob)
    if spec.blur_prob > 0:
      blur = _sample_blur(blur_seed, num_images, spec.blur_prob, spec.blur_radius)
  return jitter, solarize_thresholds, grayscale, blur


# Always a graph, even when called eagerly: the random draws then cost no
# per-op dispatch, and eager, tf.function and tf.data share one XLA
# compilation and produce the same bits.
@tf.function(autograph=False, reduce_retracing=True)
def _augment_batch_graph(images, seed, size, scale, ratio, spec, rows):
  """augment_batch with hashable Python arguments."""
  crop_seed, flip_seed = _split(seed, 5)[:2]
  shape = tf.shape(images)
  num_draws, keep = draw_rows(shape[0], rows)
  boxes = keep(sample_crop_boxes(crop_seed, num_draws, shape[1], shape[2], scale, ratio))
  flip_mask = keep(_coins(flip_seed, num_draws, 0.5)) if spec.flip else None
  draws = colour_draws(seed, shape[0], spec, rows)
  colour = tuple(draws.get(name) for name in _COLOUR_OPS)
  views, normalized = _augment_pixels(images, boxes, flip_mask, colour, size, spec.mean, spec.std)
  if "equalize" in draws:  # only the selected images: here the count may be data-dependent (apply_colour: XLA)
    indices, equalized = _equalize_selected(views, draws["equalize"])
    normalized = tf.tensor_scatter_nd_update(normalized, indices, normalize(equalized, spec.mean, spec.std))
  return normalized


def colour_draws(seed: tf.Tensor, num_images: int | tf.Tensor, spec: AugmentSpec, rows: Rows | None = None) -> dict:
  """The per-image colour draws of one view, those augment_batch makes for the same seed: the small tensors
  apply_colour needs, so the pixel work can run elsewhere (the streamed pipeline's train step).

  Returns a dict with an entry only for the ops that are on: jitter (dict of [N] and [N, passes] tensors),
  solarize ([N] thresholds), grayscale, equalize ([N] coins), blur (dict of [N] and [N, taps] tensors).
  """
  num_draws, keep = draw_rows(num_images, rows)
  jitter, solarize, grayscale, blur = _sample_colour(seed, num_draws, spec)
  draws = {"jitter": jitter, "solarize": solarize, "grayscale": grayscale, "blur": blur}
  if spec.equalize_prob > 0:
    draws["equalize"] = _coins(_split(seed, 5)[4], num_draws, spec.equalize_prob)
  return keep({name: value for name, value in draws.items() if value is not None})


_COLOUR_OPS = ("jitter", "solarize", "grayscale", "blur")  # _colour_views' order of its `colour` tuple


def apply_colour(views: tf.Tensor, draws: dict, spec: AugmentSpec) -> tf.Tensor:
  """Jitter, grayscale, blur, solarize, equalize and normalisation of crops with colour_draws' draws.

  Args:
    views: [N, S, S, 3] float32 in [0, 1] (crops, resized and flipped).
    draws: colour_draws' dict for these N images.
    spec: the AugmentSpec the draws were made with (mean, std).
  Returns:
    float32 [N, S, S, 3], normalised: augment_batch's pixels for the same crops and draws. Static shapes
    only (every image is equalized, the selected ones kept), so it also runs inside an XLA-compiled step.
  """
  colour = tuple(draws.get(name) for name in _COLOUR_OPS)
  views, normalized = _color_pixels(tf.cast(views, tf.float32), colour, spec.mean, spec.std)
  if "equalize" in draws:
    normalized = _select(draws["equalize"], normalize(_equalize_all(views), spec.mean, spec.std), normalized)
  return normalized


@tf.function(jit_compile=True, autograph=False)
def _color_pixels(views, colour, mean, std):
  """_augment_pixels after its crop: _colour_views; the [0, 1] and normalised views."""
  return _colour_views(_xla_fence(views), colour, mean, std)


CROP_ATTEMPTS = 10


def crop_draws(
  view_seeds: Sequence[tf.Tensor], num_images: int | tf.Tensor, scale: Sequence[float], flip: bool
) -> dict[str, tf.Tensor]:
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
    crop_seed, flip_seed = _split(view_seed, 5)[:2]
    area_seed, ratio_seed, top_seed, left_seed = _split(crop_seed, 4)
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


def crop_boxes(draws: dict[str, tf.Tensor], height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
  """augment.sample_crop_boxes' boxes from the draws of one image (crop_draws), for its own size.

  Args:
    draws: one image's crop_draws: area, aspect [V, attempts]; top, left [V].
    height, width: the image's size (scalar int tensors).
  Returns:
    int32 [V, 4] of (top, left, crop_height, crop_width), the boxes sample_crop_boxes gives a batch of
    images of this size for the same seeds (the same function on the same draws, so bit for bit).
  """
  return crop_boxes_from_draws(draws["area"], draws["aspect"], draws["top"], draws["left"], height, width, CROP_RATIO)
