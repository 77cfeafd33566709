"""Tests for utils/data/augment.py: METHOD.md section 4 semantics against PIL / Model Garden oracles."""

import dataclasses
import itertools
import math

import numpy as np
from official.vision.ops import augment as model_garden
from PIL import Image, ImageFilter, ImageOps
import pytest
import tensorflow as tf

from utils.data import augment, sampling

SEED = tf.constant([3, 7], tf.int32)
RATIO = (3 / 4, 4 / 3)
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
# The CIFAR-10 recipe (METHOD.md section 4).
CIFAR = augment.AugmentSpec(
  flip=True,
  color_jitter_prob=0.8,
  color_jitter_strength=0.5,
  solarize_prob=0.2,
  equalize_prob=0.2,
  grayscale_prob=0.0,
  blur_prob=0.0,
  blur_radius=(0.1, 2.0),
  mean=MEAN,
  std=STD,
)
# Only the named op changes pixels: full-image box at the input size (an exact copy), no flip.
ONLY = dataclasses.replace(CIFAR, flip=False, color_jitter_prob=0.0, solarize_prob=0.0, equalize_prob=0.0)
WHOLE = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0))


def only(images, size, spec=ONLY, **ops):
  """augment_batch with only `ops` (AugmentSpec fields) changing pixels: whole-image boxes, no flip."""
  return augment.augment_batch(images, SEED, size, spec=dataclasses.replace(spec, **ops), **WHOLE)


def random_uint8(shape, seed=0, low=0, high=256):
  return np.random.default_rng(seed).integers(low, high, size=shape, dtype=np.uint8)


def assert_rate(mask, prob):
  """Fraction of True within 3 binomial standard deviations of prob."""
  mask = np.asarray(mask)
  sigma = math.sqrt(prob * (1 - prob) / mask.size)
  assert abs(mask.mean() - prob) < 3 * sigma, (mask.mean(), prob)


def unnormalize(views):
  return np.asarray(views) * np.array(STD) + np.array(MEAN)


def color_jitter(images, seed, brightness, contrast, saturation, hue, prob):
  """ColorJitter with p = prob through the batched helpers augment_batch uses."""
  parameters = augment._sample_jitter(seed, tf.shape(images)[0], brightness, contrast, saturation, hue, prob)
  return augment._jitter(images, parameters)


# ---- PIL oracle: the reference cuts the crop, then resizes it with PIL's bilinear filter ----


def pil_resized_crop(image, box, size):
  top, left, height, width = (int(value) for value in box)
  crop = Image.fromarray(image).crop((left, top, left + width, top + height))
  return np.asarray(crop.resize((size, size), Image.BILINEAR)).astype(np.float64)


def assert_within_one_level(ours, image, box, size):
  """ours: float [size, size, 3] in [0, 1]. PIL rounds to uint8 after each of its two passes, we do not: the
  difference is at most 1 grey level (plus float32 rounding)."""
  difference = np.abs(np.asarray(ours, np.float64) * 255 - pil_resized_crop(image, box, size))
  assert difference.max() <= 1 + 1e-3, (box, size, difference.max())


def random_boxes(rng, count, height, width, min_side=1):
  sides = rng.integers(min_side, [height + 1, width + 1], size=(count, 2))
  tops = rng.integers(0, height - sides[:, 0] + 1)
  lefts = rng.integers(0, width - sides[:, 1] + 1)
  return np.stack([tops, lefts, sides[:, 0], sides[:, 1]], axis=1).astype(np.int32)


# ---- crop boxes (METHOD.md section 4: scale is a fraction of the AREA; METHOD.md section 9, pitfall 6) ----


def test_crop_boxes_follow_area_scale_and_ratio():
  height = width = 32
  scale = (0.3, 0.75)
  boxes = augment.sample_crop_boxes(SEED, 4000, height, width, scale, RATIO).numpy()
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


@pytest.mark.parametrize(
  "height, width, expected",
  [
    (32, 32, (0, 0, 32, 32)),  # ratio 1 is inside the range: whole image
    (20, 40, (0, 6, 20, 27)),  # too wide: w = round(20 * 4/3) = 27, centred
    (40, 20, (6, 0, 27, 20)),  # too tall: h = round(20 / (3/4)) = 27
  ],
)
def test_crop_boxes_fall_back_to_centre_crop(height, width, expected):
  boxes = augment.sample_crop_boxes(SEED, 5, height, width, (2.0, 3.0), RATIO)
  np.testing.assert_array_equal(boxes.numpy(), np.tile(expected, (5, 1)))


# ---- resize: PIL's antialiased bilinear on the cut-out crop (METHOD.md section 4) ----


@pytest.mark.parametrize("side", [32, 18])
def test_box_at_output_size_is_exact_copy(side):
  images = random_uint8((3, 32, 32, 3))
  as_float = images.astype(np.float32) * np.float32(1 / 255)
  boxes = tf.constant(
    [[0, 0, side, side], [32 - side, 32 - side, side, side], [5 % (33 - side), 0, side, side]], tf.int32
  )
  expected = np.stack(
    [as_float[n, top : top + side, left : left + side] for n, (top, left, _, _) in enumerate(boxes.numpy())]
  )
  np.testing.assert_array_equal(augment._crop_to_unit_range(images, boxes, side).numpy(), expected)
  np.testing.assert_array_equal(augment._crop_to_unit_range(as_float, boxes, side).numpy(), expected)
  # The XLA-compiled pixel path of augment_batch, before normalisation; a flip mirrors the copy.
  flip = tf.constant([False, True, False])
  views, _ = augment._augment_pixels(images, boxes, flip, None, side, MEAN, STD)
  expected[1] = expected[1, :, ::-1]
  np.testing.assert_array_equal(views.numpy(), expected)


@pytest.mark.parametrize("size, scale", [(18, (0.3, 0.75)), (32, (0.75, 1.0))])
def test_paper_crops_match_pil_bilinear(size, scale):
  images = random_uint8((64, 32, 32, 3), seed=2)
  boxes = augment.sample_crop_boxes(SEED, 64, 32, 32, scale, RATIO).numpy()
  crops = augment._crop_to_unit_range(images, boxes, size).numpy()
  compiled, _ = augment._augment_pixels(images, boxes, None, None, size, MEAN, STD)
  assert crops.shape == (64, size, size, 3)
  for image, box, crop, view in zip(images, boxes, crops, compiled.numpy()):
    assert_within_one_level(crop, image, box, size)
    assert_within_one_level(view, image, box, size)


@pytest.mark.parametrize("size", [18, 32, 7])
def test_random_boxes_shrunk_and_enlarged_match_pil_bilinear(size):
  rng = np.random.default_rng(size)
  images = random_uint8((96, 32, 32, 3), seed=size)
  boxes = random_boxes(rng, 96, 32, 32)
  boxes[0] = (3, 17, 10, 12)  # enlarged along both axes
  boxes[1] = (0, 0, 32, 1)  # one pixel wide
  crops, _ = augment._augment_pixels(images, boxes, None, None, size, MEAN, STD)
  for image, box, crop in zip(images, boxes, crops.numpy()):
    assert_within_one_level(crop, image, box, size)


def test_enlarging_matches_pil_on_non_square_images():
  rng = np.random.default_rng(5)
  images = random_uint8((32, 20, 28, 3), seed=5)
  boxes = random_boxes(rng, 32, 20, 28, min_side=2)
  boxes[0] = (4, 9, 10, 12)
  crops = augment._crop_to_unit_range(images, boxes, 32).numpy()
  for image, box, crop in zip(images, boxes, crops):
    assert_within_one_level(crop, image, box, 32)


def test_shrinking_is_antialiased():
  # A 1-pixel checkerboard halved: every input pixel contributes, so the output is flat mid-grey (a 2-tap
  # bilinear without antialiasing would sample single pixels and keep the pattern).
  board = (np.indices((32, 32)).sum(axis=0) % 2 * 255).astype(np.uint8)
  image = np.repeat(board[None, :, :, None], 3, axis=3)
  crop = augment._crop_to_unit_range(image, tf.constant([[0, 0, 32, 32]]), 16).numpy()[0]
  assert np.abs(crop[1:-1, 1:-1] * 255 - 127.5).max() < 1e-3
  assert_within_one_level(crop, image[0], (0, 0, 32, 32), 16)


def test_augment_batch_crop_and_flip_match_pil():
  images = random_uint8((256, 32, 32, 3), seed=3)
  views = augment.augment_batch(
    images, SEED, 18, (0.3, 0.75), dataclasses.replace(CIFAR, color_jitter_prob=0, solarize_prob=0, equalize_prob=0)
  )
  # augment_batch draws its boxes from the first of five sub-seeds.
  crop_seed = tf.random.experimental.stateless_split(SEED, 5)[0]
  boxes = augment.sample_crop_boxes(crop_seed, 256, 32, 32, (0.3, 0.75), RATIO).numpy()
  flipped = []
  for image, box, view in zip(images, boxes, unnormalize(views) * 255):
    reference = pil_resized_crop(image, box, 18)
    if np.abs(view - reference).max() <= 1 + 1e-3:
      flipped.append(False)
    else:
      assert np.abs(view - reference[:, ::-1]).max() <= 1 + 1e-3
      flipped.append(True)
  assert_rate(flipped, 0.5)


# ---- flip, solarize, equalize, jitter: rates (4000 images, 3 sigma) ----


def test_random_flip_rate_and_values():
  images = np.broadcast_to(np.arange(4, dtype=np.float32)[None, None, :, None], (4000, 2, 4, 3))
  flipped = augment.random_flip(tf.constant(images), SEED).numpy()
  is_flipped = flipped[:, 0, 0, 0] == 3
  np.testing.assert_array_equal(flipped[is_flipped], images[is_flipped, :, ::-1])
  np.testing.assert_array_equal(flipped[~is_flipped], images[~is_flipped])
  assert_rate(is_flipped, 0.5)


def test_augment_batch_solarize_rate():
  # Level 255 is inverted unless the threshold is above 255 (probability 1/256).
  white = np.full((4000, 2, 2, 3), 255, np.uint8)
  views = unnormalize(only(white, 2, solarize_prob=0.2))
  changed = np.abs(views - 1).max(axis=(1, 2, 3)) > 1e-4
  np.testing.assert_allclose(views[changed], 0, atol=1e-5)
  np.testing.assert_allclose(views[~changed], 1, atol=1e-5)
  assert_rate(changed, 0.2 * 255 / 256)
  thresholds = augment._sample_solarize(SEED, 20000, 0.2).numpy()
  selected = thresholds < 1.5  # at most (256 - 0.5) / 255: level 256 inverts nothing
  assert set(np.unique(thresholds[~selected])) == {2.0}  # not selected: above every pixel
  assert_rate(selected, 0.2)


def test_augment_batch_equalize_rate():
  # Low-contrast images (levels 0..63) are always stretched by equalize.
  images = random_uint8((4000, 24, 24, 3), high=64)
  views = unnormalize(only(images, 24, equalize_prob=0.2))
  changed = np.abs(views - images / 255).max(axis=(1, 2, 3)) > 1e-4
  assert_rate(changed, 0.2)


def test_augment_batch_color_jitter_rate():
  images = random_uint8((4000, 4, 4, 3))
  views = unnormalize(only(images, 4, color_jitter_prob=0.8))
  changed = np.abs(views - images / 255).max(axis=(1, 2, 3)) > 1e-4
  assert_rate(changed, 0.8)


# ---- solarize: a new threshold t ~ U[0, 256) per image, PIL semantics (METHOD.md section 4; section 9, pitfall 3) ----


def solarize_levels(thresholds):
  """The first inverted level of each image: threshold = (level - 0.5) / 255."""
  return np.round(np.asarray(thresholds, np.float64) * 255 + 0.5).astype(int)


def test_solarize_matches_pil_at_drawn_thresholds():
  images = special_uint8_images()
  thresholds = augment._sample_solarize(SEED, len(images), 1.0)
  ours = augment._solarize(tf.constant(images, tf.float32) * (1 / 255), thresholds).numpy()
  levels = solarize_levels(thresholds)
  assert len(set(levels)) > 6  # a new threshold for each image
  for image, level, result in zip(images, levels, ours):
    expected = np.asarray(ImageOps.solarize(Image.fromarray(image), level))
    np.testing.assert_array_equal(np.round(result * 255), expected)
    # Any real threshold t in (level - 1, level] inverts the same levels: i >= t iff i >= ceil(t).
    expected = np.asarray(ImageOps.solarize(Image.fromarray(image), level - 0.37))
    np.testing.assert_array_equal(np.round(result * 255), expected)


def test_solarize_threshold_is_uniform_on_0_256():
  # Every image holds all 256 levels. With t ~ U[0, 256), level v is inverted iff t <= v: rate v / 256.
  levels = np.arange(256)
  images = np.broadcast_to(levels[:, None].astype(np.float32) / 255, (4000, 1, 256, 3))
  thresholds = augment._sample_solarize(SEED, 4000, 1.0)
  inverted = (augment._solarize(tf.constant(images), thresholds).numpy() != images)[:, 0, :, 0]
  # Inverted levels are exactly those at or above the image's threshold.
  first = inverted.argmax(axis=1)
  np.testing.assert_array_equal(inverted, levels[None, :] >= np.where(inverted.any(axis=1), first, 256)[:, None])
  rate = inverted.mean(axis=0)
  assert rate[0] == 0 and rate[255] > 0.98
  # Kolmogorov-Smirnov: the empirical CDF of the threshold against U[0, 256) (critical value 1.95 at 0.1 %).
  assert math.sqrt(4000) * np.abs(rate - levels / 256).max() < 1.95
  assert abs(solarize_levels(thresholds).mean() - 128.5) < 3 * 73.9 / math.sqrt(4000)


# ---- colour jitter semantics (METHOD.md section 4, 9.4) ----


def test_brightness_factor_range():
  # Values below 1/1.4 never clip, so out / in is the brightness factor.
  images = tf.random.stateless_uniform([4000, 4, 4, 3], SEED, 0.05, 0.7)
  jittered = color_jitter(images, SEED, 0.4, 0, 0, 0, 1.0).numpy()
  ratio = jittered / images.numpy()
  factor = ratio[:, 0, 0, 0]
  np.testing.assert_allclose(ratio, np.broadcast_to(factor[:, None, None, None], ratio.shape), rtol=1e-5)
  assert factor.min() >= 0.6 - 1e-6 and factor.max() <= 1.4 + 1e-6
  assert factor.min() < 0.61 and factor.max() > 1.39
  assert abs(factor.mean() - 1.0) < 0.02  # uniform on [0.6, 1.4]


def test_contrast_and_saturation_keep_their_anchor():
  images = tf.random.stateless_uniform([500, 6, 6, 3], SEED, 0.3, 0.7)
  weights = np.array([0.299, 0.587, 0.114], np.float32)
  gray = images.numpy() @ weights
  # Contrast blends with the mean gray level: that mean is preserved.
  contrasted = color_jitter(images, SEED, 0, 0.4, 0, 0, 1.0).numpy()
  np.testing.assert_allclose((contrasted @ weights).mean(axis=(1, 2)), gray.mean(axis=(1, 2)), atol=1e-5)
  assert not np.allclose(contrasted, images.numpy(), atol=1e-3)
  # Saturation blends with each pixel's gray level: gray is preserved.
  saturated = color_jitter(images, SEED, 0, 0, 0.4, 0, 1.0).numpy()
  np.testing.assert_allclose(saturated @ weights, gray, atol=1e-5)
  assert not np.allclose(saturated, images.numpy(), atol=1e-3)


def test_hue_keeps_gray_images_and_matches_tf_adjust_hue():
  gray = tf.tile(tf.random.stateless_uniform([200, 5, 5, 1], SEED), [1, 1, 1, 3])
  np.testing.assert_array_equal(color_jitter(gray, SEED, 0, 0, 0, 0.1, 1.0).numpy(), gray.numpy())
  images = tf.random.stateless_uniform([8, 5, 5, 3], SEED)
  shifts = tf.constant([-0.5, -0.1, -0.03, 0.0, 0.02, 0.1, 0.37, 0.5])
  rotated = augment._rotate_hue(images, shifts).numpy()
  for image, shift, result in zip(images, shifts, rotated):
    np.testing.assert_allclose(result, tf.image.adjust_hue(image, shift), atol=2e-6)


def test_hue_shift_range():
  images = tf.random.stateless_uniform([2000, 3, 3, 3], SEED)
  jittered = color_jitter(images, SEED, 0, 0, 0, 0.1, 1.0)
  before = tf.image.rgb_to_hsv(images).numpy()[..., 0]
  after = tf.image.rgb_to_hsv(jittered).numpy()[..., 0]
  shift = (after - before + 0.5) % 1.0 - 0.5  # circular difference
  per_image = np.median(shift, axis=(1, 2))
  assert np.abs(per_image).max() <= 0.1 + 1e-4
  assert per_image.min() < -0.095 and per_image.max() > 0.095


def test_jitter_order_is_a_uniform_random_permutation_per_image():
  parameters = augment._sample_jitter(SEED, 24000, 0.4, 0.4, 0.4, 0.1, 1.0)
  factor = parameters["factor"].numpy()
  operation = (parameters["contrast"].numpy() + 2 * parameters["saturation"].numpy()).astype(int)
  orders = []
  for passes_factor, passes_operation in zip(factor, operation):
    active = passes_factor != 1.0  # factor 1 marks an inactive pass
    order = [op for op, on in zip(passes_operation[:3], active[:3]) if on]
    order.append(3)  # hue sits between the two halves
    order += [op for op, on in zip(passes_operation[3:], active[3:]) if on]
    orders.append(tuple(order))
  counts = {order: orders.count(order) for order in itertools.permutations(range(4))}
  assert sum(counts.values()) == 24000  # every image runs each op once
  expected = 24000 / 24
  for count in counts.values():
    assert abs(count - expected) < 4 * math.sqrt(expected)


# ---- equalize against Model Garden's per-image op (METHOD.md section 9, pitfall 3) ----


def special_uint8_images():
  images = random_uint8((12, 20, 20, 3), seed=4)
  images[1] = random_uint8((20, 20, 3), seed=5, low=100, high=140)
  images[2, ..., 0] = 77  # constant channel: step 0, left unchanged
  images[3, ..., 1] = np.where(np.arange(20)[:, None] < 10, 0, 255)
  images[4, :, :, 2] = 255
  images[4, 0, 0, 2] = 3  # one stray pixel: step 0 as well
  return images


def test_equalize_matches_model_garden():
  images = special_uint8_images()
  mask = tf.constant([True] * 6 + [False, True] * 3)
  indices, equalized = augment._equalize_selected(tf.constant(images, tf.float32) / 255.0, mask)
  np.testing.assert_array_equal(indices.numpy()[:, 0], np.flatnonzero(mask))
  ours = np.round(equalized.numpy() * 255).astype(np.uint8)
  for image, result in zip(images[mask.numpy()], ours):
    np.testing.assert_array_equal(result, model_garden.equalize(image).numpy())
  np.testing.assert_array_equal(ours[2, ..., 0], 77)


# ---- augment_batch: shapes, range, determinism, tf.function and tf.data ----


@pytest.mark.parametrize("size, scale, as_float", [(32, (0.75, 1.0), True), (18, (0.3, 0.75), False)])
def test_augment_batch_shape_dtype_and_range(size, scale, as_float):
  images = random_uint8((16, 32, 32, 3), seed=6)
  if as_float:
    images = images.astype(np.float32) * np.float32(1 / 255)
  views = augment.augment_batch(images, SEED, size, scale, CIFAR).numpy()
  assert views.shape == (16, size, size, 3) and views.dtype == np.float32
  mean, std = np.array(MEAN), np.array(STD)
  assert (views >= (0 - mean) / std - 1e-5).all()
  assert (views <= (1 - mean) / std + 1e-5).all()
  # Every image gets its own draws: identical inputs, different views.
  same = np.repeat(images[:1], 16, axis=0)
  views = augment.augment_batch(same, SEED, size, scale, CIFAR).numpy()
  assert len({view.tobytes() for view in views}) == 16


def test_augment_batch_requires_mean_and_std():
  images = random_uint8((2, 8, 8, 3))
  fields = dataclasses.asdict(CIFAR)
  with pytest.raises(TypeError, match="mean"):
    augment.AugmentSpec(**{name: value for name, value in fields.items() if name not in ("mean", "std")})
  with pytest.raises(TypeError, match="std"):
    augment.AugmentSpec(**{name: value for name, value in fields.items() if name != "std"})
  # The constants are applied as given.
  views = only(images, 8, mean=(0.5,) * 3, std=(0.25,) * 3).numpy()
  np.testing.assert_allclose(views, (images / 255 - 0.5) / 0.25, atol=1e-5)


def test_normalize_uint8_and_float_agree():
  images = random_uint8((2, 4, 4, 3), seed=7)
  from_uint8 = augment.normalize(images, MEAN, STD).numpy()
  from_float = augment.normalize(tf.constant(images, tf.float32) / 255.0, MEAN, STD).numpy()
  np.testing.assert_allclose(from_uint8, from_float, atol=1e-6)
  expected = (images / 255.0 - MEAN) / STD
  np.testing.assert_allclose(from_uint8, expected, atol=1e-5)


def test_augment_batch_is_deterministic_everywhere():
  images = tf.constant(random_uint8((16, 32, 32, 3), seed=8))

  def view(seed):
    return augment.augment_batch(images, seed, 18, (0.3, 0.75), CIFAR)

  eager = view(SEED).numpy()
  np.testing.assert_array_equal(view(SEED).numpy(), eager)
  assert view(tf.cast(SEED, tf.int64)).shape == eager.shape
  assert not np.allclose(view(SEED + 1).numpy(), eager, atol=0.1)
  np.testing.assert_array_equal(tf.function(view)(SEED).numpy(), eager)
  seeds = tf.data.Dataset.from_tensor_slices(tf.stack([SEED + 1, SEED]))
  from_data = list(seeds.map(view, num_parallel_calls=2).as_numpy_iterator())
  np.testing.assert_array_equal(from_data[1], eager)
  np.testing.assert_array_equal(from_data[0], view(SEED + 1).numpy())


def test_fusion_fence_fallback_gives_the_same_pixels(monkeypatch):
  # The optimization barrier only guides XLA's fusion: without it (identity fallback when the internal module
  # cannot be imported) the pixels stay the same up to float32 rounding (fused loops may round differently).
  images = tf.constant(random_uint8((32, 32, 32, 3), seed=10))
  seeds = tf.unstack(tf.random.experimental.stateless_split(SEED, 4))
  boxes = augment.sample_crop_boxes(seeds[0], 32, 32, 32, (0.3, 0.75), RATIO)
  flip = augment._coins(seeds[1], 32, 0.5)
  jitter = augment._sample_jitter(seeds[2], 32, 0.4, 0.4, 0.4, 0.1, 0.8)
  thresholds = augment._sample_solarize(seeds[3], 32, 0.5)
  arguments = (images, boxes, flip, (jitter, thresholds, None, None), 18, MEAN, STD)
  fenced = augment._augment_pixels(*arguments)
  monkeypatch.setattr(augment, "_optimization_barrier", None)
  unfenced = tf.function(augment._augment_pixels.python_function, jit_compile=True, autograph=False)(*arguments)
  for with_fence, without_fence in zip(fenced, unfenced):
    np.testing.assert_allclose(without_fence.numpy(), with_fence.numpy(), atol=1e-5)


def test_flip_and_normalize_run_in_dataset_map():
  images = tf.constant(random_uint8((8, 6, 6, 3), seed=9))

  def pipeline(seed):
    return augment.normalize(augment.random_flip(images, seed), MEAN, STD)

  eager = pipeline(SEED).numpy()
  dataset = tf.data.Dataset.from_tensors(SEED).map(pipeline)
  np.testing.assert_array_equal(next(dataset.as_numpy_iterator()), eager)
  assert eager.shape == (8, 6, 6, 3)


# ---- ImageNet recipe: RandomGrayscale and GaussianBlur as PIL computes them (METHOD.md section 4) ----

IMAGENET = dataclasses.replace(ONLY, color_jitter_strength=1.0)


def natural_uint8(count, height, width, seed):
  """Smooth colour gradients, a flat disc with a sharp edge and a little noise: photo-like content."""
  rng = np.random.default_rng(seed)
  rows, columns = np.mgrid[0:height, 0:width] / max(height, width)
  images = []
  for _ in range(count):
    frequencies = rng.uniform(0.5, 5, (3, 3))
    image = 127 + 100 * np.sin(
      2 * np.pi * (frequencies[:, 0] * columns[..., None] + frequencies[:, 1] * rows[..., None])
    )
    centre_row, centre_column, radius = rng.uniform(0, 1, 3)
    disc = (rows - centre_row) ** 2 + (columns - centre_column) ** 2 < (0.4 * radius) ** 2
    image[disc] = rng.uniform(0, 255, 3)
    image += rng.normal(0, rng.uniform(0, 15), image.shape)
    images.append(np.clip(np.round(image), 0, 255).astype(np.uint8))
  return np.stack(images)


def pil_blur(image, radius):
  return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(float(radius))))


def pil_gray(image):
  return np.repeat(np.asarray(Image.fromarray(image).convert("L"))[..., None], 3, axis=2)


def levels(views):
  """float [0, 1] -> grey levels as float64 (exact levels stay within 1e-3 of a whole number)."""
  return np.asarray(views, np.float64) * 255


def test_grayscale_equals_pil_convert_l():
  # 2^18 random colours plus the ones where decimal weights and PIL's fixed point disagree (e.g. (0, 5, 127)).
  colours = random_uint8((512, 512, 3), seed=11)
  colours[0, :4] = [[0, 5, 127], [255, 255, 255], [0, 0, 0], [1, 0, 0]]
  ours = levels(augment._grayscale(tf.constant(colours[None], tf.float32) * (1 / 255)))[0]
  np.testing.assert_allclose(ours, pil_gray(colours), atol=1e-3)


@pytest.mark.parametrize("height, width", [(19, 23), (1, 9), (6, 2)])
def test_blur_equals_pil_at_random_radii(height, width):
  # Narrow images: every output is near an edge, where PIL repeats the border pixels.
  images = np.concatenate([random_uint8((24, height, width, 3), seed=height), natural_uint8(24, height, width, width)])
  parameters = augment._sample_blur(SEED + height, len(images), 1.0, (0.1, 2.0))
  blurred = levels(augment._gaussian_blur(tf.constant(images, tf.float32) * (1 / 255), parameters))
  for image, radius, ours in zip(images, parameters["radius"].numpy(), blurred):
    np.testing.assert_allclose(ours, pil_blur(image, radius), atol=1e-3, err_msg=f"radius {radius}")


@pytest.mark.parametrize("radius", [0.1, 0.5, 1.0, 1.5, 2.0])
def test_blur_equals_pil_at_round_radii(radius):
  # Simple weights (2/3 and 1/6 at radius 1) make exact ties common: PIL's fixed-point weights decide
  # them, and exact weights would round some of them the other way (up to 3 levels off after 6 passes).
  images = random_uint8((6, 17, 21, 3), seed=12)
  parameters = augment._blur_parameters(tf.fill([6], radius), tf.ones([6], tf.bool), 2.0)
  blurred = levels(augment._gaussian_blur(tf.constant(images, tf.float32) * (1 / 255), parameters))
  for image, ours in zip(images, blurred):
    np.testing.assert_allclose(ours, pil_blur(image, radius), atol=1e-3)


def test_blur_equals_pil_for_larger_radii():
  # Up to radius 10 (the config's limit) the boxes have up to 21 taps and the fixed-point sums stay exact.
  images = natural_uint8(8, 30, 26, seed=13)
  parameters = augment._sample_blur(SEED, 8, 1.0, (2.0, 10.0))
  assert parameters["high"].shape[1] == 21
  blurred = levels(augment._gaussian_blur(tf.constant(images, tf.float32) * (1 / 255), parameters))
  for image, radius, ours in zip(images, parameters["radius"].numpy(), blurred):
    np.testing.assert_allclose(ours, pil_blur(image, radius), atol=1e-3)


def test_augment_batch_grayscale_and_blur_match_pil():
  # Full-image boxes (exact copies), no jitter: the view is PIL's blur(convert("L")) where each coin says so.
  images = np.concatenate([random_uint8((48, 13, 13, 3), seed=14), natural_uint8(48, 13, 13, 15)])
  views = levels(unnormalize(only(images, 13, grayscale_prob=0.5, blur_prob=0.5)))
  # The two new ops draw from sub-seeds 5 and 6 of 7; the first five stay those of the other ops.
  grayscale_seed, blur_seed = tf.random.experimental.stateless_split(SEED, 7)[5:]
  gray = augment._coins(grayscale_seed, 96, 0.5).numpy()
  blur = augment._sample_blur(blur_seed, 96, 0.5, (0.1, 2.0))
  assert 0 < gray.sum() < 96 and 0 < blur["apply"].numpy().sum() < 96
  for image, view, to_gray, to_blur, radius in zip(images, views, gray, blur["apply"].numpy(), blur["radius"].numpy()):
    expected = pil_gray(image) if to_gray else image
    expected = pil_blur(expected, radius) if to_blur else expected
    np.testing.assert_allclose(view, expected, atol=2e-3)


def test_grayscale_and_blur_rates_and_radius_distribution():
  # A colourful image with a white dot: it comes out grey iff converted, and radii >= 1 always dim the dot.
  images = np.broadcast_to(np.array([200, 30, 90], np.uint8), (4000, 5, 5, 3)).copy()
  images[:, 2, 2] = 255
  views = unnormalize(only(images, 5, grayscale_prob=0.2, blur_prob=0.5, blur_radius=(1.0, 2.0)))
  gray = np.abs(views - views[..., :1]).max(axis=(1, 2, 3)) < 1e-4
  blurred = views[:, 2, 2, 0] < 1 - 1e-4
  assert_rate(gray, 0.2)
  assert_rate(blurred, 0.5)
  assert_rate(gray & blurred, 0.1)  # independent coins
  np.testing.assert_allclose(views[~gray & ~blurred], images[~gray & ~blurred] / 255, atol=1e-5)
  # Radii ~ U[0.1, 2.0) per image (Kolmogorov-Smirnov, critical value 1.95 at 0.1 %); coins at rate 0.5.
  parameters = augment._sample_blur(SEED, 4000, 0.5, (0.1, 2.0))
  radii = np.sort(parameters["radius"].numpy())
  assert radii.min() >= 0.1 and radii.max() < 2.0
  uniform_cdf = (radii - 0.1) / 1.9
  assert math.sqrt(4000) * np.abs(np.arange(1, 4001) / 4000 - uniform_cdf).max() < 1.95
  assert_rate(parameters["apply"].numpy(), 0.5)


def test_strength_one_jitter_is_the_imagenet_one():
  # Constant grey images: contrast, saturation and hue leave them as they are, so out / in is the
  # brightness factor, U[1 - 0.8 s, 1 + 0.8 s] = U[0.2, 1.8] at s = 1 (grey 0.5 never clips).
  # (Shapes as in test_augment_batch_color_jitter_rate: one XLA compilation for both.)
  grey = np.full((4000, 4, 4, 3), 128, np.uint8)
  views = unnormalize(only(grey, 4, IMAGENET, color_jitter_prob=0.8))
  factor = views[:, 0, 0, 0] / (128 / 255)
  unchanged = np.abs(factor - 1) < 1e-5
  assert_rate(~unchanged, 0.8)
  assert factor.min() >= 0.2 - 1e-4 and factor.max() <= 1.8 + 1e-4
  assert factor.min() < 0.22 and factor.max() > 1.78


# ImageNet-like views of small images; the two tests below share their XLA compilations.
IMAGENET_IMAGES = natural_uint8(16, 24, 24, seed=17)
IMAGENET_VIEW = dataclasses.replace(CIFAR, color_jitter_strength=1.0, solarize_prob=0, equalize_prob=0)


def imagenet_view(seed, **options):
  spec = dataclasses.replace(IMAGENET_VIEW, **options)
  return augment.augment_batch(IMAGENET_IMAGES, seed, 16, (0.14, 1.0), spec, ratio=RATIO)


def test_new_ops_leave_the_other_draws_unchanged():
  # With the two ops in the graph but (almost) never applied, every other draw and pixel is the same.
  without = imagenet_view(SEED).numpy()
  np.testing.assert_array_equal(imagenet_view(SEED, grayscale_prob=1e-9, blur_prob=1e-9).numpy(), without)
  np.testing.assert_array_equal(imagenet_view(SEED, grayscale_prob=0, blur_prob=0).numpy(), without)
  assert not np.allclose(imagenet_view(SEED, grayscale_prob=0.2, blur_prob=0.5).numpy(), without)


def test_imagenet_views_are_deterministic_in_tf_function_and_dataset():
  def view(seed):
    return imagenet_view(seed, grayscale_prob=0.2, blur_prob=0.5)

  eager = view(SEED).numpy()
  assert eager.shape == (16, 16, 16, 3)
  np.testing.assert_array_equal(view(SEED).numpy(), eager)
  np.testing.assert_array_equal(tf.function(view)(SEED).numpy(), eager)
  seeds = tf.data.Dataset.from_tensor_slices(tf.stack([SEED + 1, SEED]))
  from_data = list(seeds.map(view, num_parallel_calls=2).as_numpy_iterator())
  np.testing.assert_array_equal(from_data[1], eager)
  np.testing.assert_array_equal(from_data[0], view(SEED + 1).numpy())


def test_rows_of_a_batch_get_the_draws_of_the_whole_batch():
  """rows=Rows(start, count, total): one replica's images are augmented exactly as those rows of the global batch."""
  rng = np.random.default_rng(5)
  images = tf.constant(rng.integers(0, 256, [8, 20, 20, 3]), tf.uint8)
  seed = tf.constant([3, 4], tf.int64)
  spec = dataclasses.replace(CIFAR, mean=(0.5,) * 3, std=(0.2,) * 3, grayscale_prob=0.3, blur_prob=0.5)
  whole = augment.augment_batch(images, seed, 12, (0.3, 1.0), spec).numpy()
  for start in (0, 2, 6):
    rows = sampling.Rows(start, 2, 8)
    part = augment.augment_batch(images[start : start + 2], seed, 12, (0.3, 1.0), spec, rows=rows)
    np.testing.assert_array_equal(part.numpy(), whole[start : start + 2])
  # without rows, the same two images get other draws
  alone = augment.augment_batch(images[2:4], seed, 12, (0.3, 1.0), spec).numpy()
  assert not np.array_equal(alone, whole[2:4])
  crops = tf.random.stateless_uniform([8, 6, 6, 3], [1, 2])
  coloured = augment.apply_colour(crops, augment.colour_draws(seed, 8, spec), spec).numpy()
  rows = sampling.Rows(4, 4, 8)
  part = augment.apply_colour(crops[4:8], augment.colour_draws(seed, 4, spec, rows), spec)
  np.testing.assert_array_equal(part.numpy(), coloured[4:8])
  flipped = augment.random_flip(crops, seed).numpy()
  rows = sampling.Rows(3, 2, 8)
  np.testing.assert_array_equal(augment.random_flip(crops[3:5], seed, rows=rows).numpy(), flipped[3:5])
