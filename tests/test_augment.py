"""Tests for utils/augment.py: METHOD.md section 4 semantics and reference ops."""
import itertools
import math

import numpy as np
import pytest
import tensorflow as tf
from official.vision.ops import augment as model_garden

from utils import augment

SEED = tf.constant([3, 7], tf.int32)
RATIO = (3 / 4, 4 / 3)


def random_uint8(shape, seed=0, low=0, high=256):
  return np.random.default_rng(seed).integers(low, high, size=shape,
                                              dtype=np.uint8)


def seed_for(index):
  return tf.constant([11, index], tf.int32)


def assert_rate(mask, prob):
  """Fraction of True within 3 binomial standard deviations of prob."""
  mask = np.asarray(mask)
  sigma = math.sqrt(prob * (1 - prob) / mask.size)
  assert abs(mask.mean() - prob) < 3 * sigma, (mask.mean(), prob)


# ---- NumPy reference: crop the box, then bilinear with half-pixel centres ----

def numpy_taps(start, length, size):
  position = start + (np.arange(size) + 0.5) * length / size - 0.5
  position = np.clip(position, start, start + length - 1)
  lower = np.floor(position).astype(int)
  upper = np.minimum(lower + 1, start + length - 1)
  return lower, upper, position - lower


def numpy_resized_crop(image, box, size):
  top, left, height, width = (int(value) for value in box)
  lower, upper, fraction = numpy_taps(top, height, size)
  image = image.astype(np.float64)
  rows = (image[lower] * (1 - fraction)[:, None, None] +
          image[upper] * fraction[:, None, None])
  lower, upper, fraction = numpy_taps(left, width, size)
  return (rows[:, lower] * (1 - fraction)[None, :, None] +
          rows[:, upper] * fraction[None, :, None])


# ---- crop boxes (METHOD.md section 4: scale is a fraction of the AREA; METHOD.md section 9, pitfall 6) ----

def test_crop_boxes_follow_area_scale_and_ratio():
  height = width = 32
  scale = (0.3, 0.75)
  boxes = augment.sample_crop_boxes(SEED, 4000, height, width, scale,
                                    RATIO).numpy()
  top, left, crop_height, crop_width = boxes.T
  assert boxes.dtype == np.int32 and boxes.shape == (4000, 4)
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + crop_height <= height).all()
  assert (left + crop_width <= width).all()
  # Rounding w and h to integers moves the area by at most (w + h) / 2 + 1/4.
  area = crop_height * crop_width
  slack = (crop_height + crop_width) / 2 + 0.25
  assert (area >= scale[0] * height * width - slack).all()
  assert (area <= scale[1] * height * width + slack).all()
  assert ((crop_width + 0.5) / (crop_height - 0.5) >= RATIO[0]).all()
  assert ((crop_width - 0.5) / (crop_height + 0.5) <= RATIO[1]).all()
  # Area fraction uniform on the scale range (a side fraction would give a
  # mean near 0.29), aspect ratios spread over the whole range.
  fraction = area / (height * width)
  assert abs(fraction.mean() - 0.525) < 0.01
  assert fraction.min() < 0.32 and fraction.max() > 0.73
  aspect = crop_width / crop_height
  assert aspect.min() < 0.8 and aspect.max() > 1.25
  # Offsets cover every valid position.
  assert set(top[crop_height == 20]) == set(range(32 - 20 + 1))


@pytest.mark.parametrize("height, width, expected", [
    (32, 32, (0, 0, 32, 32)),  # ratio 1 is inside the range: whole image
    (20, 40, (0, 6, 20, 27)),  # too wide: w = round(20 * 4/3) = 27, centred
    (40, 20, (6, 0, 27, 20)),  # too tall: h = round(20 / (3/4)) = 27
])
def test_crop_boxes_fall_back_to_centre_crop(height, width, expected):
  boxes = augment.sample_crop_boxes(SEED, 5, height, width, (2.0, 3.0), RATIO)
  np.testing.assert_array_equal(boxes.numpy(), np.tile(expected, (5, 1)))


@pytest.mark.parametrize("side", [32, 18])
def test_full_box_at_same_size_is_exact_copy(side):
  image = random_uint8((1, side, side, 3))
  as_float = image.astype(np.float32) * np.float32(1 / 255)

  def crop(images):
    return augment.random_resized_crop(images, SEED, side, (1.0, 1.0),
                                       (1.0, 1.0))

  assert crop(image).dtype == tf.float32
  np.testing.assert_array_equal(crop(image).numpy(), as_float)
  np.testing.assert_array_equal(crop(as_float).numpy(), as_float)
  np.testing.assert_array_equal(tf.function(crop)(as_float).numpy(), as_float)
  # The XLA-compiled pixel path of augment_batch, before normalisation.
  box = tf.constant([[0, 0, side, side]], tf.int32)
  views, _ = augment._augment_pixels(image, box, None, None, None, side,
                                     augment.CIFAR10_MEAN, augment.CIFAR10_STD)
  np.testing.assert_array_equal(views.numpy(), as_float)


def test_half_size_resize_averages_two_by_two_blocks():
  # Half-pixel centres: output pixel k of a 2x downscale samples input
  # position 2k + 0.5, the mean of pixels 2k and 2k + 1 along each axis.
  image = np.random.default_rng(1).random((1, 16, 16, 3)).astype(np.float32)
  box = tf.constant([[2, 4, 8, 8]], tf.int32)
  resized = augment._crop_to_unit_range(tf.constant(image), box, 4).numpy()
  crop = image[0, 2:10, 4:12]
  blocks = crop.reshape(4, 2, 4, 2, 3).mean(axis=(1, 3))
  np.testing.assert_allclose(resized[0], blocks, atol=1e-6)


@pytest.mark.parametrize("size, scale", [(18, (0.3, 0.75)), (32, (0.75, 1.0))])
def test_random_resized_crop_matches_numpy_bilinear(size, scale):
  images = random_uint8((64, 32, 32, 3), seed=2)
  boxes = augment.sample_crop_boxes(SEED, 64, 32, 32, scale, RATIO).numpy()
  crops = augment.random_resized_crop(images, SEED, size, scale).numpy()
  assert crops.shape == (64, size, size, 3)
  for image, box, crop in zip(images, boxes, crops):
    np.testing.assert_allclose(crop, numpy_resized_crop(image, box, size) / 255,
                               atol=1e-5)


def test_augment_batch_crop_and_flip_match_reference():
  images = random_uint8((256, 32, 32, 3), seed=3)
  views = augment.augment_batch(images, SEED, 18, (0.3, 0.75),
                                color_jitter_prob=0, solarize_prob=0,
                                equalize_prob=0).numpy()
  # augment_batch draws its boxes from the first of five sub-seeds.
  crop_seed = tf.random.experimental.stateless_split(SEED, 5)[0]
  boxes = augment.sample_crop_boxes(crop_seed, 256, 32, 32, (0.3, 0.75),
                                    RATIO).numpy()
  mean, std = np.array(augment.CIFAR10_MEAN), np.array(augment.CIFAR10_STD)
  flipped = []
  for image, box, view in zip(images, boxes, views):
    reference = (numpy_resized_crop(image, box, 18) / 255 - mean) / std
    if np.allclose(view, reference, atol=1e-4):
      flipped.append(False)
    else:
      np.testing.assert_allclose(view, reference[:, ::-1], atol=1e-4)
      flipped.append(True)
  assert_rate(flipped, 0.5)


# ---- flip, solarize, equalize, jitter: rates (4000 images, 3 sigma) ----

def test_random_flip_rate_and_values():
  images = np.broadcast_to(np.arange(4, dtype=np.float32)[None, None, :, None],
                           (4000, 2, 4, 3))
  flipped = augment.random_flip(tf.constant(images), SEED).numpy()
  is_flipped = flipped[:, 0, 0, 0] == 3
  np.testing.assert_array_equal(flipped[is_flipped],
                                images[is_flipped, :, ::-1])
  np.testing.assert_array_equal(flipped[~is_flipped], images[~is_flipped])
  assert_rate(is_flipped, 0.5)


def test_solarize_rate():
  images = tf.fill([4000, 2, 2, 3], 0.8)
  solarized = augment.solarize(images, SEED, 0.2).numpy()
  changed = solarized[:, 0, 0, 0] != np.float32(0.8)
  np.testing.assert_allclose(solarized[changed], 0.2, atol=1e-6)
  assert_rate(changed, 0.2)


def test_equalize_rate():
  # Low-contrast images (levels 0..63) are always stretched by equalize.
  images = tf.constant(random_uint8((4000, 24, 24, 3), high=64),
                       tf.float32) / 255.0
  equalized = augment.equalize(images, SEED, 0.2).numpy()
  changed = (equalized != images.numpy()).any(axis=(1, 2, 3))
  assert_rate(changed, 0.2)


def test_color_jitter_rate_leaves_others_untouched():
  images = tf.constant(random_uint8((4000, 4, 4, 3)), tf.float32) / 255.0
  jittered = augment.color_jitter(images, SEED, 0.4, 0.4, 0.4, 0.1,
                                  0.8).numpy()
  changed = (jittered != images.numpy()).any(axis=(1, 2, 3))
  assert_rate(changed, 0.8)


# ---- colour jitter semantics (METHOD.md section 4, 9.4) ----

def test_brightness_factor_range():
  # Values below 1/1.4 never clip, so out / in is the brightness factor.
  images = tf.random.stateless_uniform([4000, 4, 4, 3], SEED, 0.05, 0.7)
  jittered = augment.color_jitter(images, SEED, 0.4, 0, 0, 0, 1.0).numpy()
  ratio = jittered / images.numpy()
  factor = ratio[:, 0, 0, 0]
  np.testing.assert_allclose(
      ratio, np.broadcast_to(factor[:, None, None, None], ratio.shape),
      rtol=1e-5)
  assert factor.min() >= 0.6 - 1e-6 and factor.max() <= 1.4 + 1e-6
  assert factor.min() < 0.61 and factor.max() > 1.39
  assert abs(factor.mean() - 1.0) < 0.02  # uniform on [0.6, 1.4]


def test_contrast_and_saturation_keep_their_anchor():
  images = tf.random.stateless_uniform([500, 6, 6, 3], SEED, 0.3, 0.7)
  weights = np.array([0.299, 0.587, 0.114], np.float32)
  gray = images.numpy() @ weights
  # Contrast blends with the mean gray level: that mean is preserved.
  contrasted = augment.color_jitter(images, SEED, 0, 0.4, 0, 0, 1.0).numpy()
  np.testing.assert_allclose((contrasted @ weights).mean(axis=(1, 2)),
                             gray.mean(axis=(1, 2)), atol=1e-5)
  assert not np.allclose(contrasted, images.numpy(), atol=1e-3)
  # Saturation blends with each pixel's gray level: gray is preserved.
  saturated = augment.color_jitter(images, SEED, 0, 0, 0.4, 0, 1.0).numpy()
  np.testing.assert_allclose(saturated @ weights, gray, atol=1e-5)
  assert not np.allclose(saturated, images.numpy(), atol=1e-3)


def test_hue_keeps_gray_images_and_matches_tf_adjust_hue():
  gray = tf.tile(tf.random.stateless_uniform([200, 5, 5, 1], SEED),
                 [1, 1, 1, 3])
  np.testing.assert_array_equal(
      augment.color_jitter(gray, SEED, 0, 0, 0, 0.1, 1.0).numpy(), gray.numpy())
  images = tf.random.stateless_uniform([8, 5, 5, 3], SEED)
  shifts = tf.constant([-0.5, -0.1, -0.03, 0.0, 0.02, 0.1, 0.37, 0.5])
  rotated = augment._rotate_hue(images, shifts).numpy()
  for image, shift, result in zip(images, shifts, rotated):
    np.testing.assert_allclose(result, tf.image.adjust_hue(image, shift),
                               atol=2e-6)


def test_hue_shift_range():
  images = tf.random.stateless_uniform([2000, 3, 3, 3], SEED)
  jittered = augment.color_jitter(images, SEED, 0, 0, 0, 0.1, 1.0)
  before = tf.image.rgb_to_hsv(images).numpy()[..., 0]
  after = tf.image.rgb_to_hsv(jittered).numpy()[..., 0]
  shift = (after - before + 0.5) % 1.0 - 0.5  # circular difference
  per_image = np.median(shift, axis=(1, 2))
  assert np.abs(per_image).max() <= 0.1 + 1e-4
  assert per_image.min() < -0.095 and per_image.max() > 0.095


def test_jitter_order_is_a_uniform_random_permutation_per_image():
  parameters = augment._sample_jitter(SEED, 24000, 0.4, 0.4, 0.4, 0.1, 1.0)
  factor = parameters["factor"].numpy()
  operation = (parameters["contrast"].numpy() +
               2 * parameters["saturation"].numpy()).astype(int)
  orders = []
  for passes_factor, passes_operation in zip(factor, operation):
    active = passes_factor != 1.0  # factor 1 marks an inactive pass
    order = [op for op, on in zip(passes_operation[:3], active[:3]) if on]
    order.append(3)  # hue sits between the two halves
    order += [op for op, on in zip(passes_operation[3:], active[3:]) if on]
    orders.append(tuple(order))
  counts = {order: orders.count(order)
            for order in itertools.permutations(range(4))}
  assert sum(counts.values()) == 24000  # every image runs each op once
  expected = 24000 / 24
  for count in counts.values():
    assert abs(count - expected) < 4 * math.sqrt(expected)


# ---- solarize / equalize against Model Garden's per-image ops (METHOD.md section 9, pitfall 3) ----

def special_uint8_images():
  images = random_uint8((12, 20, 20, 3), seed=4)
  images[1] = random_uint8((20, 20, 3), seed=5, low=100, high=140)
  images[2, ..., 0] = 77  # constant channel: step 0, left unchanged
  images[3, ..., 1] = np.where(np.arange(20)[:, None] < 10, 0, 255)
  images[4, :, :, 2] = 255
  images[4, 0, 0, 2] = 3  # one stray pixel: step 0 as well
  return images


def test_solarize_matches_model_garden():
  images = special_uint8_images()
  ours = augment.solarize(tf.constant(images, tf.float32) / 255.0, SEED, 1.0)
  ours = np.round(ours.numpy() * 255).astype(np.uint8)
  for image, result in zip(images, ours):
    np.testing.assert_array_equal(result, model_garden.solarize(image).numpy())


def test_equalize_matches_model_garden():
  images = special_uint8_images()
  ours = augment.equalize(tf.constant(images, tf.float32) / 255.0, SEED, 1.0)
  ours = np.round(ours.numpy() * 255).astype(np.uint8)
  for image, result in zip(images, ours):
    np.testing.assert_array_equal(result, model_garden.equalize(image).numpy())
  np.testing.assert_array_equal(ours[2, ..., 0], 77)


# ---- augment_batch: shapes, range, determinism, tf.function and tf.data ----

@pytest.mark.parametrize("size, scale, as_float",
                         [(32, (0.75, 1.0), True), (18, (0.3, 0.75), False)])
def test_augment_batch_shape_dtype_and_range(size, scale, as_float):
  images = random_uint8((16, 32, 32, 3), seed=6)
  if as_float:
    images = images.astype(np.float32) * np.float32(1 / 255)
  views = augment.augment_batch(images, SEED, size, scale).numpy()
  assert views.shape == (16, size, size, 3) and views.dtype == np.float32
  mean, std = np.array(augment.CIFAR10_MEAN), np.array(augment.CIFAR10_STD)
  assert (views >= (0 - mean) / std - 1e-5).all()
  assert (views <= (1 - mean) / std + 1e-5).all()
  # Every image gets its own draws: identical inputs, different views.
  same = np.repeat(images[:1], 16, axis=0)
  views = augment.augment_batch(same, SEED, size, scale).numpy()
  assert len({view.tobytes() for view in views}) == 16


def test_normalize_uint8_and_float_agree():
  images = random_uint8((2, 4, 4, 3), seed=7)
  from_uint8 = augment.normalize(images, augment.CIFAR10_MEAN,
                                 augment.CIFAR10_STD).numpy()
  from_float = augment.normalize(tf.constant(images, tf.float32) / 255.0,
                                 augment.CIFAR10_MEAN,
                                 augment.CIFAR10_STD).numpy()
  np.testing.assert_allclose(from_uint8, from_float, atol=1e-6)
  expected = ((images / 255.0 - augment.CIFAR10_MEAN) / augment.CIFAR10_STD)
  np.testing.assert_allclose(from_uint8, expected, atol=1e-5)


def test_augment_batch_is_deterministic_everywhere():
  images = tf.constant(random_uint8((16, 32, 32, 3), seed=8))

  def view(seed):
    return augment.augment_batch(images, seed, 18, (0.3, 0.75))

  eager = view(SEED).numpy()
  np.testing.assert_array_equal(view(SEED).numpy(), eager)
  assert view(tf.cast(SEED, tf.int64)).shape == eager.shape
  assert not np.allclose(view(SEED + 1).numpy(), eager, atol=0.1)
  np.testing.assert_array_equal(tf.function(view)(SEED).numpy(), eager)
  seeds = tf.data.Dataset.from_tensor_slices(tf.stack([SEED + 1, SEED]))
  from_data = list(seeds.map(view, num_parallel_calls=2).as_numpy_iterator())
  np.testing.assert_array_equal(from_data[1], eager)
  np.testing.assert_array_equal(from_data[0], view(SEED + 1).numpy())


def test_public_ops_run_in_dataset_map():
  images = tf.constant(random_uint8((8, 32, 32, 3), seed=9))

  def pipeline(seed):
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 5))
    views = augment.random_resized_crop(images, seeds[0], 18, (0.3, 0.75))
    views = augment.random_flip(views, seeds[1])
    views = augment.color_jitter(views, seeds[2], 0.4, 0.4, 0.4, 0.1, 0.8)
    views = augment.solarize(views, seeds[3], 0.2)
    views = augment.equalize(views, seeds[4], 0.2)
    return augment.normalize(views, augment.CIFAR10_MEAN, augment.CIFAR10_STD)

  eager = pipeline(SEED).numpy()
  dataset = tf.data.Dataset.from_tensors(SEED).map(pipeline)
  np.testing.assert_array_equal(next(dataset.as_numpy_iterator()), eager)
  assert eager.shape == (8, 18, 18, 3)
