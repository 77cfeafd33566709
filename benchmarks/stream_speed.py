"""Streamed-JPEG throughput (utils/data/pipelines.streamed_views), ImageNet view recipe; writes misc/stream_speed.md.

Generates JPEGs of ImageNet's typical size (500 x 375, 4:2:0 chroma, quality 90) in a temporary class
folder and measures, in one process and in alternating rounds (the best round of each counts):
  * streamed: utils/data/pipelines.streamed_views as pre-training runs it, 2 x 224 px crops at area scale
    (0.14, 1) and 6 x 96 px crops at (0.05, 0.14) per image, flip on, colour stage reduced to the
    normalisation (the crop work only);
  * the same from TFRecord shards of the same JPEGs (records read by byte offset);
  * baseline: the same work written plainly in tf.data: read, decode (the same accurate DCT), 8 random
    boxes, slice, tf.image.resize(bilinear, antialias=True), batch, normalise. The target is streamed /
    baseline >= 0.8;
  * streamed with the ImageNet colour recipe (jitter s = 1 with p = 0.8, plus grayscale p = 0.2 and blur
    p = 0.5 when utils/data/augment.py has them);
  * one 224 px view per image (a support view): decoding only the crop's window of the JPEG, as the
    pipeline does for single views, against decoding the whole image;
  * eight views per image by decoding eight windows, against decoding once (what the pipeline does).

  python -m benchmarks.stream_speed [--images=200] [--batch=32] [--epochs=3] [--rounds=3]
                                    [--output=misc/stream_speed.md]

from the repository root. The view recipe is fixed (ImageNet's, above): no --config.
"""

import datetime
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags
import numpy as np
from PIL import Image
import tensorflow as tf

from utils import devices
from utils.data import augment, decoding, image_files, pipelines, sampling, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_integer("images", 200, "JPEGs generated.", lower_bound=1)
flags.DEFINE_integer("batch", 32, "Images per step.", lower_bound=1)
flags.DEFINE_integer("epochs", 3, "Passes over the images per measurement.", lower_bound=1)
flags.DEFINE_integer("rounds", 3, "Alternating rounds; the best of each counts.", lower_bound=1)
flags.DEFINE_string("output", os.path.join(ROOT, "misc", "stream_speed.md"), "Markdown file written.")

LARGE, SMALL, MULTICROP = 224, 96, 6
LARGE_SCALE, SMALL_SCALE = (0.14, 1.0), (0.05, 0.14)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_jpegs(folder, count, classes=4, seed=0):
  """`count` 500 x 375 JPEGs with smooth structure and noise (so they compress like photos)."""
  rng = np.random.default_rng(seed)
  for index in range(count):
    coarse = rng.uniform(0, 255, [1, 6, 8, 3]).astype(np.float32)
    image = tf.image.resize(coarse, [375, 500], "bicubic").numpy()[0] + rng.normal(0, 18, [375, 500, 3])
    path = os.path.join(folder, "train", f"class{index % classes}", f"{index:05d}.jpg")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90, subsampling=2)


def write_records(folder, paths, shards=4):
  """The same JPEGs as TFRecord shards (Model Garden's layout); returns their sources.RecordImages."""
  bounds = np.linspace(0, len(paths), shards + 1).astype(int)
  for shard in range(shards):
    with tf.io.TFRecordWriter(os.path.join(folder, f"train-{shard:05d}-of-{shards:05d}")) as writer:
      for path in paths[bounds[shard] : bounds[shard + 1]]:
        with open(path, "rb") as file:
          encoded = file.read()
        feature = {
          image_files.IMAGE_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
          image_files.LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[1])),
        }
        writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
  return sources.open_records(folder, "train-*", "", evaluation=False).train


def view_spec(colour):
  """The ImageNet recipe's views (colour) or crops and flips only."""
  return augment.AugmentSpec(
    flip=True,
    color_jitter_prob=0.8 if colour else 0.0,
    color_jitter_strength=1.0,
    solarize_prob=0.0,
    equalize_prob=0.0,
    grayscale_prob=0.2 if colour else 0.0,
    blur_prob=0.5 if colour else 0.0,
    blur_radius=(0.1, 2.0),
    mean=MEAN,
    std=STD,
  )


def streamed(images, batch_size, num_steps, colour):
  def batches():
    for step in range(num_steps):
      yield step, sampling.unlabeled_indices(len(images), batch_size, step, seed=0)

  groups = [(0, 2, LARGE, LARGE_SCALE), (2, MULTICROP, SMALL, SMALL_SCALE)]
  rows = sampling.Rows(0, batch_size, batch_size)  # the whole batch
  return pipelines.streamed_views(images, batches, groups, 0, view_spec(colour), rows).prefetch(tf.data.AUTOTUNE)


def random_box(height, width, scale, seed):
  """A RandomResizedCrop-like box (one attempt, clipped): the baseline's cheap box."""
  area = tf.cast(height * width, tf.float32) * tf.random.stateless_uniform([], seed, scale[0], scale[1])
  aspect = tf.exp(tf.random.stateless_uniform([], seed + 1, np.log(3 / 4), np.log(4 / 3)))
  crop_height = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32), 1, height)
  crop_width = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32), 1, width)
  top = tf.cast(tf.random.stateless_uniform([], seed + 2) * tf.cast(height - crop_height + 1, tf.float32), tf.int32)
  left = tf.cast(tf.random.stateless_uniform([], seed + 3) * tf.cast(width - crop_width + 1, tf.float32), tf.int32)
  return top, left, crop_height, crop_width


def baseline(paths, batch_size, num_steps):
  """Read, decode, 8 boxes, slice, tf.image.resize (antialiased bilinear), flip, batch, normalise."""
  order = np.concatenate([sampling.unlabeled_indices(len(paths), batch_size, step, 0) for step in range(num_steps)])
  paths = tf.constant(paths)

  def load(position, index):
    image = tf.io.decode_jpeg(tf.io.read_file(paths[index]), channels=3, dct_method="INTEGER_ACCURATE")
    shape = tf.shape(image)
    views = []
    for view in range(2 + MULTICROP):
      size, scale = (LARGE, LARGE_SCALE) if view < 2 else (SMALL, SMALL_SCALE)
      seed = tf.stack([position, tf.cast(view * 4, tf.int64)])
      top, left, height, width = random_box(shape[0], shape[1], scale, seed)
      crop = tf.cast(image[top : top + height, left : left + width], tf.float32)
      crop = tf.image.resize(crop, [size, size], "bilinear", antialias=True) * (1 / 255)
      views.append(tf.image.stateless_random_flip_left_right(crop, seed + 5))
    return tuple(views[:2]), tuple(views[2:])

  dataset = tf.data.Dataset.from_tensor_slices((np.arange(len(order), dtype=np.int64), order))
  dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(batch_size)
  dataset = dataset.map(
    lambda large, small: tuple(augment.normalize(view, MEAN, STD) for view in large + small),
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  return dataset.prefetch(tf.data.AUTOTUNE)


def single_view(images, count, window, batch):
  """One 224 px view per image, decoding the crop's window (the pipeline's single-view path) or the whole JPEG."""

  def load(index):
    draws = augment.crop_draws([tf.stack([index, tf.constant(1, tf.int64)])], 1, LARGE_SCALE, flip=False)
    draws = {key: value[0] for key, value in draws.items()}
    encoded = images.read(index)
    if window:
      pixels, boxes = decoding._decode_one_box(encoded, images.describe(index), draws)
    else:
      pixels = decoding.decode_image(encoded, images.describe(index))
      boxes = augment.crop_boxes(draws, tf.shape(pixels)[0], tf.shape(pixels)[1])
    return decoding.resize_box(pixels, boxes[0], LARGE)

  dataset = tf.data.Dataset.from_tensor_slices(np.arange(count, dtype=np.int64) % len(images))
  return dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(batch).prefetch(2)


def eight_windows(images, count, batch):
  """Eight views per image, each from its own decoded window (decode_and_crop_jpeg eight times)."""
  seeds = [tf.constant([9, view], tf.int64) for view in range(2 + MULTICROP)]

  def load(index):
    encoded = images.read(index)
    views = []
    for view, seed in enumerate(seeds):
      size, scale = (LARGE, LARGE_SCALE) if view < 2 else (SMALL, SMALL_SCALE)
      draws = augment.crop_draws([seed + tf.stack([index, 0])], 1, scale, flip=False)
      pixels, boxes = decoding._decode_one_box(encoded, images.describe(index), {k: v[0] for k, v in draws.items()})
      views.append(decoding.resize_box(pixels, boxes[0], size))
    return tuple(views)

  dataset = tf.data.Dataset.from_tensor_slices(np.arange(count, dtype=np.int64) % len(images))
  return dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(batch).prefetch(2)


def images_per_second(make_dataset, num_images, batch):
  """Images/s of one pass over a fresh dataset of `batch` images per element, after its first element (tracing,
  XLA compilation)."""
  iterator = iter(make_dataset())
  next(iterator)
  start = time.perf_counter()
  count = 0
  for _ in iterator:
    count += batch
  elapsed = time.perf_counter() - start
  assert count == num_images - batch, (count, num_images)
  return count / elapsed


def load_average():
  try:
    return os.getloadavg()[0]
  except OSError:
    return float("nan")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; settings are flags (--images=200)")
  args = flags.FLAGS  # parsed by app.run

  with tempfile.TemporaryDirectory() as folder:
    write_jpegs(folder, args.images)
    source = sources.open_folder(folder)
    images = source.train
    records = write_records(folder, images.paths)
    steps = args.epochs * (len(images) // args.batch)
    total = steps * args.batch
    fewer = max(total // 4 // args.batch, 2) * args.batch  # eight decodes per image: slow
    crops_per_image = 2 + MULTICROP
    candidates = {
      "streamed": lambda: streamed(images, args.batch, steps, colour=False),
      "baseline": lambda: baseline(images.paths, args.batch, steps),
      "streamed_records": lambda: streamed(records, args.batch, steps, colour=False),
      "streamed_colour": lambda: streamed(images, args.batch, steps, colour=True),
      "one_view_window": lambda: single_view(images, total, window=True, batch=args.batch),
      "one_view_whole": lambda: single_view(images, total, window=False, batch=args.batch),
      "eight_windows": lambda: eight_windows(images, fewer, batch=args.batch),
    }
    sizes = {"eight_windows": fewer}
    rates = {name: [] for name in candidates}
    loads = [load_average()]
    for round_number in range(args.rounds):
      for name, make in candidates.items():
        rate = images_per_second(make, sizes.get(name, total), args.batch)
        rates[name].append(rate)
        print(f"round {round_number + 1}: {name}: {rate:.1f} images/s", flush=True)
      loads.append(load_average())

  best = {name: max(values) for name, values in rates.items()}

  def ratios(first, second):
    """'median R, per round a / b / ...' of rates[first] / rates[second], the rounds paired."""
    per_round = [a / b for a, b in zip(rates[first], rates[second])]
    return f"median {np.median(per_round):.2f}x, per round " + " / ".join(f"{r:.2f}" for r in per_round)

  rows = [
    ("streamed: utils/data/pipelines.streamed_views, crops only", "streamed", crops_per_image),
    ("baseline: plain tf.data decode + crop + tf.image.resize", "baseline", crops_per_image),
    ("streamed from TFRecords (4 shards, records read by offset), crops only", "streamed_records", crops_per_image),
    ("streamed with the ImageNet colour recipe", "streamed_colour", crops_per_image),
    ("one 224 px view per image, decoding the crop's window", "one_view_window", 1),
    ("one 224 px view per image, decoding the whole JPEG", "one_view_whole", 1),
    ("eight views from eight decoded windows (not used)", "eight_windows", crops_per_image),
  ]
  lines = [
    "# Streamed-image input speed",
    "",
    f"Machine: {devices.machine_description()}. Written by `python -m benchmarks.stream_speed --images="
    f"{args.images} --batch={args.batch} --epochs={args.epochs} --rounds={args.rounds}` on "
    f"{datetime.date.today().isoformat()}; load average during the run {min(loads):.1f} to {max(loads):.1f} "
    f"(on {os.cpu_count()} cores). **Preliminary**: the machine was shared with other jobs, so absolute "
    "numbers are low and noisy; the rows were measured in alternating rounds in one process (best round of "
    "each), so their ratios are the comparable part.",
    "",
    f"{args.images} generated JPEGs of 500 x 375 px (4:2:0, quality 90) in a class folder; the ImageNet view "
    f"recipe: 2 x {LARGE} px crops at area scale {LARGE_SCALE} and {MULTICROP} x {SMALL} px at "
    f"{SMALL_SCALE} per image, {args.batch} images per step.",
    "",
    "| pipeline | images/s (best round) | crops/s (best round) | images/s in each round |",
    "|---|---|---|---|",
  ]
  lines += [
    f"| {what} | {best[name]:.1f} | {best[name] * crops:.0f} | {' / '.join(f'{rate:.0f}' for rate in rates[name])} |"
    for what, name, crops in rows
  ]
  lines += [
    "",
    f"- streamed / baseline: **{best['streamed'] / best['baseline']:.2f}** for the best rounds (target >= 0.8); "
    f"{ratios('streamed', 'baseline')}.",
    f"- single view, window / whole decode: {ratios('one_view_window', 'one_view_whole')}.",
    f"- eight views, one decode / eight windows: {ratios('streamed', 'eight_windows')} (so multi-view images are "
    "decoded once).",
  ]
  os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
  with open(args.output, "w") as file:
    file.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
