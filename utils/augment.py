"""Batched, stateless image augmentation for PAWS on CIFAR-10 (METHOD.md section 4).

Every op transforms a whole batch at once, with its own random draws for each
image. Per-image ops (tf.map_fn, or Model Garden's `official.vision.ops.augment`
functions, which take one image) run dozens of small kernels per image and
cannot feed the trainer: PAWS needs 8 views of 256 images per step, and the
input pipeline must reach >= 20 000 crops/s on 2 CPU cores. `augment_batch`
additionally runs the pixel work as one XLA-compiled function.

The ops follow the reference, which works on PIL uint8 images: crops are
resized with PIL's bilinear filter (a triangle widened by the scale factor when
shrinking, i.e. antialiased), and Solarize draws a new threshold in [0, 256)
for each image it solarizes.

Randomness is stateless: each function takes a `seed` (int32 or int64 tensor
of shape [2]) and derives sub-seeds with `stateless_split`, so a stream is
reproducible, resumable and independent of tf.data parallelism, and the same
seed gives the same bits eagerly, in tf.function and in tf.data.

Images are float32 in [0, 1] between ops (uint8 is accepted where noted).
"""

import math

import tensorflow as tf

try:
  # Not exported under tf.*: an internal module that may move. It is only a
  # fusion hint (see _xla_fence), so without it the pixels stay the same.
  from tensorflow.compiler.tf2xla.python import xla as _xla

  _optimization_barrier = _xla.optimization_barrier
except (ImportError, AttributeError):
  _optimization_barrier = None

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


def sample_crop_boxes(seed, num_images, height, width, scale, ratio, attempts=10):
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
  height_float = tf.cast(height, tf.float32)
  width_float = tf.cast(width, tf.float32)
  shape = tf.stack([num_images, attempts])

  area = height_float * width_float * tf.random.stateless_uniform(shape, area_seed, scale[0], scale[1])
  aspect = tf.exp(tf.random.stateless_uniform(shape, ratio_seed, math.log(ratio[0]), math.log(ratio[1])))
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
  top = tf.floor(tf.random.stateless_uniform([num_images], top_seed) * (height_float - crop_height + 1))
  left = tf.floor(tf.random.stateless_uniform([num_images], left_seed) * (width_float - crop_width + 1))
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


def random_flip(images, seed, prob=0.5):
  """Flips each image left-right with probability `prob` (METHOD.md section 4).

  Args:
    images: [N, H, W, C] tensor.
    seed: int32/int64 tensor of shape [2].
    prob: flip probability per image.

  Returns:
    tensor like `images`.
  """
  flip = _coins(seed, tf.shape(images)[0], prob)
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
  num_rows = shape[0] * shape[3]
  levels = tf.cast(tf.round(images * 255.0), tf.int32)
  # One 256-bin histogram per (image, channel) row: offset the levels by
  # 256 * row and count them all with one bincount.
  bins = levels + tf.reshape(tf.range(num_rows) * 256, [shape[0], 1, 1, -1])
  histogram = tf.reshape(
    tf.math.bincount(tf.reshape(bins, [-1]), minlength=num_rows * 256, maxlength=num_rows * 256), [num_rows, 256]
  )
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


def normalize(images, mean, std):
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
@tf.function(jit_compile=True, autograph=False)
def _augment_pixels(images, boxes, flip, jitter, solarize_thresholds, size, mean, std):
  """Crop, flip, jitter, solarize; returns the [0, 1] and normalised views."""
  views = _xla_fence(_crop_to_unit_range(images, boxes, size, flip))
  if jitter is not None:
    views = _jitter(views, jitter, _xla_fence)
  if solarize_thresholds is not None:
    views = _solarize(views, solarize_thresholds)
  return views, normalize(views, mean, std)


def augment_batch(
  images,
  seed,
  size,
  scale,
  ratio=(3 / 4, 4 / 3),
  flip=True,
  color_jitter_prob=0.8,
  color_jitter_strength=0.5,
  solarize_prob=0.2,
  equalize_prob=0.2,
  *,
  mean,
  std,
):
  """One PAWS view of every image in a batch (METHOD.md section 4).

  RandomResizedCrop (PIL bilinear resize) -> horizontal flip (p = 0.5) ->
  ColorJitter(0.8 s, 0.8 s, 0.8 s, 0.2 s) with p = color_jitter_prob ->
  Solarize (threshold ~ U[0, 256) per image) -> Equalize -> Normalize. Ops
  whose probability or strength is 0 are left out of the graph. The pixel
  work runs as one XLA-compiled function (compiled once per input shape and
  configuration).

  Args:
    images: [N, H, W, 3] uint8 or float in [0, 1].
    seed: int32/int64 tensor of shape [2].
    size: output side in pixels.
    scale: (min, max) crop area fraction.
    ratio: (min, max) crop aspect ratio.
    flip: whether to flip images with probability 0.5.
    color_jitter_prob, color_jitter_strength: ColorJitter probability and s.
    solarize_prob, equalize_prob: per-image probabilities.
    mean, std: per-channel normalisation constants (required: the config's
      data.mean and data.std).

  Returns:
    float32 [N, size, size, 3], normalised.
  """
  return _augment_batch_graph(
    images,
    seed,
    int(size),
    tuple(scale),
    tuple(ratio),
    bool(flip),
    float(color_jitter_prob),
    float(color_jitter_strength),
    float(solarize_prob),
    float(equalize_prob),
    tuple(mean),
    tuple(std),
  )


# Always a graph, even when called eagerly: the random draws then cost no
# per-op dispatch, and eager, tf.function and tf.data share one XLA
# compilation and produce the same bits.
@tf.function(autograph=False, reduce_retracing=True)
def _augment_batch_graph(
  images,
  seed,
  size,
  scale,
  ratio,
  flip,
  color_jitter_prob,
  color_jitter_strength,
  solarize_prob,
  equalize_prob,
  mean,
  std,
):
  """augment_batch with hashable Python arguments."""
  crop_seed, flip_seed, jitter_seed, solarize_seed, equalize_seed = _split(seed, 5)
  shape = tf.shape(images)
  num_images = shape[0]
  boxes = sample_crop_boxes(crop_seed, num_images, shape[1], shape[2], scale, ratio)
  flip_mask = _coins(flip_seed, num_images, 0.5) if flip else None
  jitter = None
  if color_jitter_prob > 0 and color_jitter_strength > 0:
    strength = 0.8 * color_jitter_strength
    jitter = _sample_jitter(
      jitter_seed, num_images, strength, strength, strength, 0.2 * color_jitter_strength, color_jitter_prob
    )
  solarize_thresholds = _sample_solarize(solarize_seed, num_images, solarize_prob) if solarize_prob > 0 else None
  views, normalized = _augment_pixels(images, boxes, flip_mask, jitter, solarize_thresholds, size, mean, std)
  if equalize_prob > 0:
    indices, equalized = _equalize_selected(views, _coins(equalize_seed, num_images, equalize_prob))
    normalized = tf.tensor_scatter_nd_update(normalized, indices, normalize(equalized, mean, std))
  return normalized
