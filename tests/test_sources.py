"""Image folders and TFRecords streamed from disk (utils/data/: sources, image_files, decoding, streamed pipelines).

The digits images written as PNG files in class folders, and as TFRecords, must give the batches of the
in-memory digits path: same steps, same crops, same colour draws, to float rounding.
"""

import io
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

import config as presets
from tests import scriptrun
from utils import losses
from utils.data import augment, datasets, decoding, image_files, pipelines, sampling, sources, splits
from utils.errors import UserError
from utils.model import encoder as encoder_lib

# On [0, 1] pixels: streamed crops are resized by tf.image.resize (PIL's filter, float32 weights), in-memory
# ones by augment's weight matrices (the same filter, weights from integers).
TOLERANCE = 3e-6
DIGITS_STD = 0.5  # the digits preset normalises with std 0.5: view differences are twice the pixel ones


def write_png(path, image):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(image).save(path)


def write_folder(root, train_images, train_labels, val_images=None, val_labels=None):
  """ROOT/train/digit<label>/<index>.png (index = position in the arrays), same for val."""
  for split, images, labels in (("train", train_images, train_labels), ("val", val_images, val_labels)):
    if images is None:
      continue
    for index, (image, label) in enumerate(zip(images, labels)):
      write_png(os.path.join(root, split, f"digit{label}", f"{index:05d}.png"), image)
  return str(root)


def encode(image, form="PNG", **options):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, form, **options)
  return buffer.getvalue()


def example(features):
  """A serialized tf.train.Example from {key: bytes or int}."""
  feature = {
    key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))
    if isinstance(value, bytes)
    else tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))
    for key, value in features.items()
  }
  return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_records(pattern_path, images, labels, shards, label_offset=1, with_names=True):
  """Shards of Model Garden's ImageNet layout (labels 1-based as its conversion writes them), in array order."""
  bounds = np.linspace(0, len(images), shards + 1).astype(int)
  for shard in range(shards):
    with tf.io.TFRecordWriter(f"{pattern_path}-{shard:05d}-of-{shards:05d}") as writer:
      for index in range(bounds[shard], bounds[shard + 1]):
        features = {image_files.IMAGE_KEY: encode(images[index]), image_files.LABEL_KEY: labels[index] + label_offset}
        if with_names:
          features[image_files.NAME_KEY] = f"img_{index:05d}.png".encode()
        writer.write(example(features))


@pytest.fixture(scope="module")
def digits():
  return datasets.load_digits()


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory, digits):
  train_images, train_labels, test_images, test_labels = digits
  return write_folder(tmp_path_factory.mktemp("digits_folder"), train_images, train_labels, test_images, test_labels)


@pytest.fixture(scope="module")
def digits_records(tmp_path_factory, digits):
  root = tmp_path_factory.mktemp("digits_records")
  train_images, train_labels, test_images, test_labels = digits
  write_records(str(root / "train"), train_images, train_labels, shards=3)
  write_records(str(root / "validation"), test_images, test_labels, shards=2)
  return str(root)


def data_config(dataset="digits", **changes):
  config = presets.get_config("digits")
  with config.unlocked():
    config.data.dataset = dataset
    config.pretrain.multicrop = 2
    # 4 labels per class, all of them supports in every step (as scriptrun.TINY): small batches
    config.data.labeled_per_class = config.pretrain.images_per_class = config.finetune.images_per_class = 4
    for key, value in changes.items():
      setattr(config.data, key, value)
  return config


def folder_order(source):
  """Indices of the in-memory arrays in the folder's image order (file names are those indices)."""
  return np.array([int(os.path.basename(name)[:5]) for name in source.train.names])


def step_batch(element, data):
  """A pre-training element as the train step embeds it: a streamed one after its colour stage."""
  if len(element) == 3:
    return pipelines.colour_pretrain_batch(*element, augment.AugmentSpec.from_config(data))
  return element


def assert_same_batches(expected, actual, atol, data):
  expected, actual = ([step_batch(element, data) for element in batches] for batches in (expected, actual))
  for (views_a, supports_a), (views_b, supports_b) in zip(expected, actual, strict=True):
    assert len(views_a) == len(views_b)
    for a, b in zip(views_a, views_b):
      assert a.shape == b.shape
      np.testing.assert_allclose(a.numpy(), b.numpy(), atol=atol, rtol=0)
    np.testing.assert_allclose(supports_a.numpy(), supports_b.numpy(), atol=atol, rtol=0)


# --- The pieces: boxes, resize, decoding, colour stage ------------------------------------------------


def test_per_image_crop_boxes_are_sample_crop_boxes_bit_for_bit():
  rng = np.random.default_rng(3)
  num_images = 24
  # Extreme aspect ratios exercise the centre-crop fallback.
  sizes = [(int(h), int(w)) for h, w in rng.integers(3, 500, size=[num_images - 2, 2])] + [(4, 300), (300, 5)]
  view_seeds = [tf.constant([11, v], tf.int64) for v in range(3)]
  for scale in ((0.14, 1.0), (0.05, 0.14)):
    draws = augment.crop_draws(view_seeds, num_images, scale, flip=True)
    for position, (height, width) in enumerate(sizes):
      mine = augment.crop_boxes({k: v[position] for k, v in draws.items()}, height, width).numpy()
      for view, view_seed in enumerate(view_seeds):
        crop_seed = tf.random.experimental.stateless_split(view_seed, 5)[0]
        expected = augment.sample_crop_boxes(crop_seed, num_images, height, width, scale, augment.CROP_RATIO)
        np.testing.assert_array_equal(mine[view], expected.numpy()[position])
  # the flips are augment_batch's coins
  flip_seed = tf.random.experimental.stateless_split(view_seeds[1], 5)[1]
  coins = tf.random.stateless_uniform([num_images], flip_seed) < 0.5
  np.testing.assert_array_equal(draws["flip"][:, 1].numpy(), coins.numpy())


def test_resize_box_is_pils_bilinear_and_augments_crop():
  rng = np.random.default_rng(0)
  for _ in range(40):
    height, width = (int(x) for x in rng.integers(2, 70, size=2))
    image = rng.integers(0, 256, [height, width, 3], dtype=np.uint8)
    crop_height, crop_width = int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1))
    top, left = int(rng.integers(0, height - crop_height + 1)), int(rng.integers(0, width - crop_width + 1))
    size = int(rng.integers(1, 40))
    box = tf.constant([top, left, crop_height, crop_width], tf.int32)
    mine = decoding.resize_box(tf.constant(image), box, size).numpy()
    in_batch = augment._resize_boxes(tf.constant(image[None]), box[None], size).numpy()[0] / 255.0
    np.testing.assert_allclose(mine, in_batch, atol=TOLERANCE, rtol=0)
    # PIL rounds to uint8 after each of its two passes: within one grey level.
    crop = Image.fromarray(image).crop((left, top, left + crop_width, top + crop_height))
    pil = np.asarray(crop.resize((size, size), Image.BILINEAR), np.float32) / 255.0
    assert np.abs(mine - pil).max() <= 1.0 / 255 + 1e-6
  # a box of the output size is copied exactly; so is a whole image of that size
  image = rng.integers(0, 256, [9, 9, 3], dtype=np.uint8)
  whole = decoding.resize_box(tf.constant(image), decoding.centre_box(9, 9), 9).numpy()
  np.testing.assert_array_equal(whole, image.astype(np.float32) * np.float32(1 / 255))


@pytest.mark.parametrize("options", [{"subsampling": 0}, {"subsampling": 1}, {"subsampling": 2}, {"progressive": True}])
def test_jpeg_decoding_is_pils_and_window_decoding_is_exact(options):
  rng = np.random.default_rng(1)
  smooth = tf.image.resize(rng.uniform(0, 255, [1, 12, 16, 3]), [75, 100]).numpy()[0]
  image = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
  data = encode(image, "JPEG", quality=90, **options)
  decoded = decoding.decode_image(tf.constant(data), "test.jpg").numpy()
  np.testing.assert_array_equal(decoded, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
  # One view: only the crop's window is decoded; its pixels are the full decode's.
  for index in range(25):
    draws = augment.crop_draws([tf.constant([index, 7], tf.int64)], 1, (0.02, 0.5), flip=False)
    draws = {key: value[0] for key, value in draws.items()}
    pixels, boxes = decoding.decode_one_box(tf.constant(data), "test.jpg", draws)
    top, left, height, width = boxes.numpy()[0]
    expected_box = augment.crop_boxes(draws, 75, 100).numpy()[0]
    assert (height, width) == tuple(expected_box[2:])
    np.testing.assert_array_equal(
      pixels.numpy()[top : top + height, left : left + width],
      decoded[expected_box[0] : expected_box[0] + height, expected_box[1] : expected_box[1] + width],
    )


def test_views_of_all_groups_from_one_decode_equal_a_decode_per_group():
  rng = np.random.default_rng(3)
  smooth = tf.image.resize(rng.uniform(0, 255, [1, 6, 8, 3]), [45, 60]).numpy()[0]
  encoded = tf.constant(encode(np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8), "JPEG"))
  seeds = [tf.constant([5, view], tf.int64) for view in range(5)]
  groups = [augment.crop_draws(seeds[:2], 1, (0.3, 1.0), True), augment.crop_draws(seeds[2:], 1, (0.05, 0.2), True)]
  groups = [{key: value[0] for key, value in draws.items()} for draws in groups]
  views = pipelines._cut_views(encoded, "x.jpg", groups, [20, 8])
  # the oracle: one decode per group, float crops resized by tf.image.resize, flipped by tf.where
  expected = []
  for draws, size in zip(groups, [20, 8]):
    pixels = decoding.decode_image(encoded, "x.jpg")
    boxes = augment.crop_boxes(draws, 45, 60).numpy()
    for (top, left, height, width), flip in zip(boxes, draws["flip"]):
      crop = tf.cast(pixels[top : top + height, left : left + width], tf.float32)
      crop = tf.image.resize(crop, [size, size], "bilinear", antialias=True) * (1.0 / 255.0)
      expected.append(tf.where(flip, tf.reverse(crop, axis=[1]), crop).numpy())
  assert len(views) == 5 and any(groups[1]["flip"]) and not all(groups[1]["flip"])
  for view, oracle in zip(views, expected):
    np.testing.assert_array_equal(view.numpy(), oracle)


def test_color_stage_on_separate_crops_equals_augment_batch():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, [16, 20, 24, 3], dtype=np.uint8)
  seed = tf.constant([3, 4], tf.int64)
  spec = augment.AugmentSpec(
    flip=True,
    color_jitter_prob=0.8,
    color_jitter_strength=1.0,
    solarize_prob=0.3,
    equalize_prob=0.3,
    grayscale_prob=0.3,  # the ImageNet recipe's ops too
    blur_prob=0.5,
    blur_radius=(0.1, 2.0),
    mean=(0.5, 0.4, 0.3),
    std=(0.2, 0.25, 0.3),
  )
  expected = augment.augment_batch(images, seed, 12, (0.3, 1.0), spec).numpy()
  draws = augment.crop_draws([seed], len(images), (0.3, 1.0), flip=True)
  one_image = lambda i: [{key: value[i] for key, value in draws.items()}]
  crops = [
    pipelines._cut_views(tf.constant(encode(image)), "x.png", one_image(i), [12])[0] for i, image in enumerate(images)
  ]
  actual = augment.apply_colour(tf.stack(crops), augment.colour_draws(seed, len(crops), spec), spec).numpy()
  np.testing.assert_allclose(actual, expected, atol=TOLERANCE / 0.2 * 5, rtol=0)


# --- Whole pipelines against the in-memory digits path ----------------------------------------------------


def test_folder_streams_the_in_memory_batches(digits_folder, digits):
  train_images, train_labels, test_images, test_labels = digits
  config = data_config("folder")
  source = sources.open_source(config.data, digits_folder, evaluation=True)
  assert source.class_names == [f"digit{label}" for label in range(10)]
  order = folder_order(source)
  images, labels = train_images[order], train_labels[order]
  np.testing.assert_array_equal(source.train_labels, labels)
  labeled = splits.select_labeled_indices(labels, 4, 152)
  steps = dict(start_step=9, total_steps=11)  # across the epoch boundary (10 steps per epoch)
  plan = sampling.PawsPlan(labeled, labels, source.num_unlabeled, config.pretrain, 5, 1)  # one plan for both
  expected = pipelines.pretrain_dataset(images, plan, config.data, config.pretrain, **steps)
  actual = source.pretrain_dataset(plan, config.data, config.pretrain, **steps)
  assert_same_batches(expected, actual, TOLERANCE / DIGITS_STD, config.data)
  # fine-tuning views and evaluation batches: whole images, exactly
  with config.unlocked():
    config.data.flip = True  # flip-only views exercise the flip coins too
  plan = sampling.SuncetPlan(labeled, labels, config.finetune, 5, 1)
  expected = pipelines.finetune_dataset(images, plan, config.finetune, config.data, **steps)
  for a, b in zip(expected, source.finetune_dataset(plan, config.finetune, config.data, **steps), strict=True):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  # evaluation images: the reference's Resize + CenterCrop (sources.EVALUATION_TRANSFORM), of the same pixels
  supports, support_labels, queries, query_labels = source.evaluation_sets(labeled, config.data, 100)
  np.testing.assert_array_equal(support_labels, labels[labeled])

  def evaluation_batches(arrays):
    prepared = np.stack(
      [sources.EVALUATION_TRANSFORM(tf.constant(image), config.data.image_size).numpy() for image in arrays]
    )
    return augment.normalize(prepared, config.data.mean, config.data.std).numpy()

  np.testing.assert_array_equal(evaluation_batches(images[labeled]), np.concatenate(list(supports)))
  val_order = np.array([int(os.path.basename(name)[:5]) for name in source.evaluation.names])
  np.testing.assert_array_equal(query_labels, test_labels[val_order])
  np.testing.assert_array_equal(evaluation_batches(test_images[val_order]), np.concatenate(list(queries)))


def first_loss(model, views, supports, pretrain):
  """The PAWS loss of one batch, as steps.paws_steps computes it on one replica (no update)."""
  p = pretrain
  supports = tf.reshape(supports, [-1] + supports.shape[-3:].as_list())
  h, z = encoder_lib.embed_views(model, [[supports, views[0], views[1]], list(views[2:])], training=True)
  num_support = supports.shape[0]
  labels = losses.support_labels(p.classes_per_batch, p.images_per_class, p.support_views, smoothing=p.label_smoothing)
  large = h[num_support : num_support + 2 * p.batch_size]
  targets = tf.concat([large[p.batch_size :], large[: p.batch_size]], axis=0)
  ce, me_max = losses.paws_loss(
    losses.SnnInputs(z[num_support:], z[:num_support], labels),
    losses.SnnInputs(targets, h[:num_support], labels),
    multicrop=p.multicrop,
  )
  return float(ce + me_max)


def test_tfrecords_stream_the_in_memory_batches_and_losses(digits_records, digits):
  train_images, train_labels, test_images, test_labels = digits
  config = data_config("tfrecord")
  source = sources.open_source(config.data, digits_records, evaluation=True)
  # Records in file then record order are the arrays' order; 1-based labels become classes 0..9.
  np.testing.assert_array_equal(source.train_labels, train_labels)
  np.testing.assert_array_equal(source.evaluation.labels, test_labels)
  assert source.train.names[5] == "img_00005.png" and len(source.train.files) == 3
  labeled = splits.select_labeled_indices(train_labels, 4, 152)
  steps = dict(start_step=3, total_steps=4)
  plan = sampling.PawsPlan(labeled, train_labels, source.num_unlabeled, config.pretrain, 0, 1)
  expected = list(pipelines.pretrain_dataset(train_images, plan, config.data, config.pretrain, **steps))
  actual = list(source.pretrain_dataset(plan, config.data, config.pretrain, **steps))
  assert_same_batches(expected, actual, TOLERANCE / DIGITS_STD, config.data)
  actual = [step_batch(element, config.data) for element in actual]
  tf.keras.utils.set_random_seed(0)
  model = encoder_lib.build_encoder(config.model, config.data.image_size)
  loss_in_memory = first_loss(model, *expected[0], config.pretrain)
  loss_streamed = first_loss(model, *actual[0], config.pretrain)
  assert loss_streamed == pytest.approx(loss_in_memory, abs=1e-5)


def test_resumed_stream_is_the_uninterrupted_one(tmp_path):
  config = data_config("folder", color_jitter_prob=0.8, solarize_prob=0.2, equalize_prob=0.2, flip=True)
  with config.unlocked():
    config.pretrain.update(batch_size=5, classes_per_batch=3, images_per_class=2)
  source = sources.open_source(config.data, small_folder(tmp_path, size=(21, 14)))
  labeled = splits.select_labeled_indices(source.train_labels, 2, 1)
  plan = sampling.PawsPlan(labeled, source.train_labels, source.num_unlabeled, config.pretrain, 2, 1)
  full = list(source.pretrain_dataset(plan, config.data, config.pretrain, start_step=0, total_steps=3))
  resumed = list(source.pretrain_dataset(plan, config.data, config.pretrain, start_step=2, total_steps=3))
  assert_same_batches(full[2:], resumed, 0.0, config.data)


# --- Split files by name ----------------------------------------------------------------------------


def split_lines(tmp_path, lines):
  path = tmp_path / "split.txt"
  path.write_text("".join(f"{line}\n" for line in lines))
  return str(path)


def test_split_file_by_names_paths_or_indices(digits_folder, tmp_path):
  source = sources.open_source(data_config("folder").data, digits_folder)
  chosen = splits.select_labeled_indices(source.train_labels, 2, 0)
  names = [source.train.names[index] for index in chosen]
  bare = [os.path.basename(name) for name in names]
  for lines in (names, bare, [str(index) for index in chosen]):
    np.testing.assert_array_equal(source.read_split_file(split_lines(tmp_path, lines), expected_count=20), chosen)
  cases = {
    "names no training image": names[:-1] + ["digit3/nosuch.png"],
    "repeats line": names[:-1] + names[:1],
    "are expected": names[:-1],
    "classes are unbalanced": names[:-1] + [source.train.names[chosen[0] + 2]],
  }
  for phrase, lines in cases.items():
    with pytest.raises(UserError, match=phrase):
      source.read_split_file(split_lines(tmp_path, lines), expected_count=20)
  # The same file name in two class folders: the bare name is ambiguous there, the path is not.
  twin = os.path.join(digits_folder, "train", "digit1", bare[0])
  write_png(twin, np.zeros([16, 16, 3], np.uint8))
  try:
    twin_source = sources.open_source(data_config("folder").data, digits_folder)
    with pytest.raises(UserError, match="is ambiguous"):
      twin_source.read_split_file(split_lines(tmp_path, [bare[0]]))
    np.testing.assert_array_equal(
      twin_source.read_split_file(split_lines(tmp_path, [names[0]]), check_balance=False),
      [twin_source.train.names.tolist().index(names[0])],
    )
  finally:
    os.remove(twin)


# --- Bad inputs -------------------------------------------------------------------------------------------


def small_folder(root, classes=3, per_class=4, size=(12, 10)):
  rng = np.random.default_rng(0)
  for label in range(classes):
    for index in range(per_class):
      write_png(os.path.join(root, "train", f"c{label}", f"{index}.png"), rng.integers(0, 256, size + (3,), np.uint8))
  return str(root)


def test_folder_layout_errors(tmp_path):
  data = data_config("folder").data
  with pytest.raises(UserError, match="needs --data_dir"):
    sources.open_source(data, None)
  with pytest.raises(UserError, match="data directory"):
    sources.open_source(data, str(tmp_path / "nowhere"))
  with pytest.raises(UserError, match="train not found"):
    sources.open_source(data, str(tmp_path))
  root = small_folder(tmp_path / "data")
  os.makedirs(os.path.join(root, "train", "empty"))
  with open(os.path.join(root, "train", "empty", "notes.txt"), "w") as file:
    file.write("not an image")
  with pytest.raises(UserError, match="holds no .jpg, .jpeg, .png images"):
    sources.open_source(data, root)
  os.remove(os.path.join(root, "train", "empty", "notes.txt"))
  os.rmdir(os.path.join(root, "train", "empty"))
  write_png(os.path.join(root, "val", "stranger", "0.png"), np.zeros([4, 4, 3], np.uint8))
  with pytest.raises(UserError, match="is not a class of"):
    sources.open_source(data, root)


def test_unlabeled_folder_adds_unlabeled_images_only(tmp_path):
  root = small_folder(tmp_path)
  for index in range(5):
    write_png(os.path.join(root, "unlabeled", "deep", f"u{index}.jpg"), np.full([7, 9, 3], index, np.uint8))
  source = sources.open_source(data_config("folder").data, root)
  assert len(source.train_labels) == 12 and source.num_unlabeled == 17
  assert list(source.unlabeled.labels[12:]) == [-1] * 5
  assert source.unlabeled.names[12] == os.path.join("unlabeled", "deep", "u0.jpg")
  # nn_eval needs a val folder
  with pytest.raises(UserError, match="evaluation needs labeled images"):
    source.evaluation_sets(np.arange(3), data_config("folder").data, 10)


def test_unreadable_images_are_named(tmp_path):
  root = small_folder(tmp_path)
  broken = os.path.join(root, "unlabeled", "broken.png")
  os.makedirs(os.path.dirname(broken))
  with open(broken, "wb") as file:
    file.write(b"<html>not found</html>")
  config = data_config("folder", large_crop_size=8, small_crop_size=4)
  with config.unlocked():
    config.pretrain.update(batch_size=13, classes_per_batch=3, images_per_class=2)
  source = sources.open_source(config.data, root)
  # a labeled image is checked before training
  labeled = np.arange(12)
  with open(source.train.paths[5], "r+b") as file:
    good = file.read()
    file.seek(0)
    file.truncate(len(good) // 2)  # a truncated PNG: its header is intact
  with pytest.raises(UserError, match=f"cannot decode labeled image {source.train.paths[5]}"):
    source.check_images(labeled)
  with open(source.train.paths[5], "wb") as file:
    file.write(good)
  source.check_images(labeled)
  # an unlabeled one while streaming: the step (13 of 13 images) names it
  plan = sampling.PawsPlan(labeled, source.train_labels, source.num_unlabeled, config.pretrain, 0, 1)
  dataset = source.pretrain_dataset(plan, config.data, config.pretrain, start_step=0, total_steps=2)
  message = f"cannot decode {broken} .it is not a JPEG or PNG image.*step 1"
  with pytest.raises(UserError, match=message), source.stream_errors(plan, lambda: 0, 1):
    next(iter(dataset))


def test_tfrecord_errors(tmp_path, digits):
  data = data_config("tfrecord").data
  images, labels = digits[0][:6], digits[1][:6]
  with pytest.raises(UserError, match="no TFRecord files match"):
    sources.open_source(data, str(tmp_path))
  with tf.io.TFRecordWriter(str(tmp_path / "train-00000-of-00001")) as writer:
    writer.write(example({image_files.IMAGE_KEY: encode(images[0]), image_files.LABEL_KEY: 1}))
    writer.write(example({image_files.IMAGE_KEY: encode(images[1]), "image/class/text": b"cat"}))
  with pytest.raises(UserError, match="record 1 has no image/class/label"):
    sources.open_source(data, str(tmp_path))
  with tf.io.TFRecordWriter(str(tmp_path / "train-00000-of-00001")) as writer:
    writer.write(example({image_files.IMAGE_KEY: 3, image_files.LABEL_KEY: 1}))
  with pytest.raises(UserError, match="the records must be tf.train.Example records with image/encoded"):
    sources.open_source(data, str(tmp_path))
  with open(tmp_path / "train-00000-of-00001", "wb") as file:
    file.write(encode(images[0]))
  with pytest.raises(UserError, match="is not an uncompressed TFRecord file"):
    sources.open_source(data, str(tmp_path))
  write_records(str(tmp_path / "train"), images, labels, shards=1)
  write_records(str(tmp_path / "validation"), images, labels + 20, shards=1)
  with pytest.raises(UserError, match="which no training record has"):
    sources.open_source(data, str(tmp_path), evaluation=True)
  # without image/filename, split files name records FILE:RECORD
  write_records(str(tmp_path / "train"), images, labels, shards=1, with_names=False)
  source = sources.open_source(data, str(tmp_path))
  assert source.train.names[4] == "train-00000-of-00001:4"
  path = split_lines(tmp_path, ["train-00000-of-00001:4", "train-00000-of-00001:1"])
  np.testing.assert_array_equal(source.read_split_file(path, check_balance=False), [1, 4])


# --- Through the scripts ---------------------------------------------------------------------------------


FOLDER_RUN = [
  *scriptrun.TINY,
  "--config.pretrain.epochs=1",
  "--config.pretrain.warmup_epochs=0",
  "--config.finetune.epochs=1",
]


def test_folder_through_the_three_scripts(digits_folder, tmp_path):
  workdir = str(tmp_path / "run")
  flags = [*FOLDER_RUN, "--config.data.dataset=folder", f"--data_dir={digits_folder}", f"--workdir={workdir}"]
  for script in ("paws_train.py", "fine_tune.py", "nn_eval.py"):
    result = scriptrun.run(script, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
  assert "1347 training images in 10 classes, 450 validation images" in result.stdout
  assert "40 supports, 450 test images" in result.stdout
  with open(os.path.join(workdir, "labeled_files.txt")) as file:
    names = file.read().split()
  indices = np.loadtxt(os.path.join(workdir, "labeled_indices.txt"), dtype=np.int64)
  source = sources.open_source(data_config("folder").data, digits_folder)
  assert names == [source.train.names[index] for index in indices]
  # the names file is a split file of the same subset
  np.testing.assert_array_equal(source.read_split_file(os.path.join(workdir, "labeled_files.txt")), indices)


def test_bad_folder_inputs_fail_cleanly_through_the_script(tmp_path):
  root = small_folder(tmp_path / "data", classes=2, per_class=3)
  os.makedirs(os.path.join(root, "train", "c9"))
  workdir = tmp_path / "workdir"
  workdir.mkdir()
  flags = [
    "--config.data.dataset=folder",
    f"--data_dir={root}",
    "--config.pretrain.batch_size=4",
    "--config.pretrain.classes_per_batch=2",
    "--config.pretrain.images_per_class=1",
  ]
  scriptrun.fails_cleanly("paws_train.py", *flags, error="empty_class_folder", workdir=str(workdir))
  os.rmdir(os.path.join(root, "train", "c9"))
  split = split_lines(tmp_path, ["c0/0.png", "c1/nosuch.png"])
  scriptrun.fails_cleanly(
    "paws_train.py",
    *flags,
    "--config.data.labeled_per_class=1",
    f"--split_file={split}",
    error="split_unknown_name",
    workdir=str(workdir),
  )
