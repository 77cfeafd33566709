"""Streamed ImageNet input against the reference's Pillow chain, per CPU core; writes misc/stream_speed.md.

In one run, on the same JPEGs (written here: 500 x 375 px, 4:2:0, quality 90, or --images_dir=FOLDER, every
.jpg/.jpeg/.png under it) and the same cores, for 1 and 2 cores (--cores), in alternating rounds:
  * reference: the reference's per-image chain written in Pillow, in one worker process per core, each
    pinned to its core (os.sched_setaffinity): decode once; per view RandomResizedCrop (torchvision's box
    draw, PIL crop + bilinear resize), flip p 0.5, ColorJitter(0.8, 0.8, 0.8, 0.2) with p 0.8 (ImageEnhance
    brightness / contrast / colour and hue through HSV, in random order), RandomGrayscale p 0.2,
    GaussianBlur p 0.5 with radius U[0.1, 2] (ImageFilter), ToTensor + Normalize in numpy; 2 x 224 px
    views at area scale (0.14, 1) and 6 x 96 px at (0.05, 0.14) (METHOD.md section 10). Also "crops only"
    (no colour op): the rows of issue 22's table.
  * project: utils/data/pipelines.streamed_views with the config.py:imagenet views, in a child process pinned
    to the same cores, TensorFlow's intra/inter-op pools and the tf.data pool set to that many threads:
    decode, crop, resize, flip and the colour draws (the pixels of pre-training's host side: the colour stage
    runs in the train step); and, for comparison, the same with augment.apply_colour run on the host too.
  * the colour stage's cost in a CPU train step: augment.apply_colour of one batch's 8 views, compiled, on
    the same cores, in ms per image (what moving it into the step adds to a CPU run; on a GPU it is
    batched device work).

  python -m benchmarks.stream_speed [--images=200] [--images_dir=FOLDER] [--cores=1,2] [--batch=32]
                                    [--epochs=2] [--rounds=2] [--output=misc/stream_speed.md]

from the repository root. The view recipe is fixed (config.py:imagenet's): no --config.
"""

import datetime
import json
import math
import multiprocessing
import os
import random
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_integer("images", 200, "JPEGs written (without --images_dir).", lower_bound=1)
flags.DEFINE_string("images_dir", None, "A folder of your own images (.jpg/.jpeg/.png, searched recursively).")
flags.DEFINE_list("cores", ["1", "2"], "Core counts measured, each on cores 0..N-1.")
flags.DEFINE_integer("batch", 32, "Images per step of the project's pipeline.", lower_bound=1)
flags.DEFINE_integer("epochs", 2, "Passes over the images per measurement.", lower_bound=1)
flags.DEFINE_integer("rounds", 2, "Alternating rounds; the best of each counts.", lower_bound=1)
flags.DEFINE_string("output", os.path.join(ROOT, "misc", "stream_speed.md"), "Markdown file written.")
flags.DEFINE_string("child", None, "Internal: run the project's measurements on this many cores, print JSON.")
flags.DEFINE_string("paths_file", None, "Internal: the child's list of image paths.")

LARGE, SMALL, MULTICROP = 224, 96, 6
LARGE_SCALE, SMALL_SCALE = (0.14, 1.0), (0.05, 0.14)
VIEWS = [(LARGE, LARGE_SCALE)] * 2 + [(SMALL, SMALL_SCALE)] * MULTICROP
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def write_jpegs(folder, count, seed=0):
  """`count` 500 x 375 JPEGs with smooth structure and noise (so they compress like photos); their paths."""
  rng = np.random.default_rng(seed)
  paths = []
  for index in range(count):
    coarse = Image.fromarray(rng.uniform(0, 255, [6, 8, 3]).astype(np.uint8)).resize((500, 375), Image.BICUBIC)
    image = np.asarray(coarse, np.float32) + rng.normal(0, 18, [375, 500, 3])
    paths.append(os.path.join(folder, f"{index:05d}.jpg"))
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(paths[-1], "JPEG", quality=90, subsampling=2)
  return paths


def image_paths(folder):
  found = sorted(
    os.path.join(directory, name)
    for directory, _, names in os.walk(folder)
    for name in names
    if name.lower().endswith((".jpg", ".jpeg", ".png"))
  )
  if not found:
    raise app.UsageError(f"--images_dir={folder} holds no .jpg, .jpeg or .png file")
  return found


# --- The reference's chain in Pillow --------------------------------------------------------------------------


def crop_box(rng, width, height, scale, ratio=(3 / 4, 4 / 3)):
  """torchvision's RandomResizedCrop.get_params: (left, top, right, bottom)."""
  area = width * height
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top, left = rng.randint(0, height - h), rng.randint(0, width - w)
      return left, top, left + w, top + h
  w, h = width, height  # centre crop of the clamped ratio
  if width / height < ratio[0]:
    h = int(round(width / ratio[0]))
  elif width / height > ratio[1]:
    w = int(round(height * ratio[1]))
  left, top = (width - w) // 2, (height - h) // 2
  return left, top, left + w, top + h


def adjust_hue(image, factor):
  """torchvision's adjust_hue of a PIL image: the H channel shifted in uint8, through HSV."""
  hue, saturation, value = image.convert("HSV").split()
  shifted = np.array(hue, np.uint8)
  shifted += np.uint8(int(factor * 255) % 256)
  return Image.merge("HSV", (Image.fromarray(shifted, "L"), saturation, value)).convert("RGB")


def colour_jitter(rng, image, strength=(0.8, 0.8, 0.8, 0.2)):
  brightness, contrast, saturation, hue = strength
  ops = [
    lambda im: ImageEnhance.Brightness(im).enhance(rng.uniform(max(0, 1 - brightness), 1 + brightness)),
    lambda im: ImageEnhance.Contrast(im).enhance(rng.uniform(max(0, 1 - contrast), 1 + contrast)),
    lambda im: ImageEnhance.Color(im).enhance(rng.uniform(max(0, 1 - saturation), 1 + saturation)),
    lambda im: adjust_hue(im, rng.uniform(-hue, hue)),
  ]
  rng.shuffle(ops)
  for op in ops:
    image = op(image)
  return image


def reference_views(path, rng, colour):
  """The reference's 8 views of one image file, float32 [3, S, S] normalised."""
  image = Image.open(path).convert("RGB")
  views = []
  for size, scale in VIEWS:
    view = image.crop(crop_box(rng, image.width, image.height, scale)).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
      view = view.transpose(Image.FLIP_LEFT_RIGHT)
    if colour:
      if rng.random() < 0.8:
        view = colour_jitter(rng, view)
      if rng.random() < 0.2:
        view = view.convert("L").convert("RGB")
      if rng.random() < 0.5:
        view = view.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    array = (np.asarray(view, np.float32) * (1 / 255) - MEAN) / STD
    views.append(array.transpose(2, 0, 1))
  return views


def reference_worker(core, paths, colour, barrier, results):
  os.sched_setaffinity(0, {core})
  rng = random.Random(core)
  reference_views(paths[0], rng, colour)  # warm-up: imports and caches
  barrier.wait()
  start, cpu = time.perf_counter(), time.process_time()
  for path in paths:
    reference_views(path, rng, colour)
  results.put((start, time.perf_counter(), time.process_time() - cpu))


def reference_rate(paths, cores, colour, epochs):
  """(images/s, CPU ms per image) of the Pillow chain in one process per core (0..cores-1), each on its share
  of the images."""
  context = multiprocessing.get_context("spawn")  # workers without this process's threads
  barrier, results = context.Barrier(cores), context.Queue()
  work = list(paths) * epochs
  shares = [work[core::cores] for core in range(cores)]
  workers = [
    context.Process(target=reference_worker, args=(core, shares[core], colour, barrier, results))
    for core in range(cores)
  ]
  for worker in workers:
    worker.start()
  times = [results.get() for _ in workers]
  for worker in workers:
    worker.join()
  wall = max(end for _, end, _ in times) - min(start for start, _, _ in times)
  return len(work) / wall, sum(cpu for _, _, cpu in times) * 1000 / len(work)


# --- The project's pipeline, in a pinned child process ---------------------------------------------------------


def project_measurements(paths, cores, batch, epochs):
  """In this (pinned) process: {"crops": images/s, "crops_cpu_ms": CPU ms per image, "host_colour": images/s,
  "step_colour_ms": ms per image}."""
  import tensorflow as tf

  import config as presets
  from utils.data import augment, image_files, pipelines, sampling

  tf.config.threading.set_intra_op_parallelism_threads(cores)
  tf.config.threading.set_inter_op_parallelism_threads(cores)
  images = image_files.FolderImages(paths, paths, np.full(len(paths), -1))
  spec = augment.AugmentSpec.from_config(presets.get_config("imagenet").data)
  groups = [(0, 2, LARGE, LARGE_SCALE), (2, MULTICROP, SMALL, SMALL_SCALE)]
  steps = epochs * len(paths) // batch
  options = tf.data.Options()
  options.threading.private_threadpool_size = cores

  def dataset(host_colour):
    def batches():
      for step in range(steps + 1):  # the first one is the warm-up
        yield step, sampling.unlabeled_indices(len(paths), batch, step, seed=0)

    views = pipelines.streamed_views(images, batches, groups, 0, spec, sampling.Rows(0, batch, batch))
    if host_colour:
      views = views.map(lambda crops, colour: tuple(map(lambda c, d: augment.apply_colour(c, d, spec), crops, colour)))
    return views.prefetch(2).with_options(options)

  def rate(host_colour):
    iterator = iter(dataset(host_colour))
    first = next(iterator)
    start, cpu = time.perf_counter(), time.process_time()
    count = sum(1 for _ in iterator)
    assert count == steps
    return steps * batch / (time.perf_counter() - start), (time.process_time() - cpu) * 1000 / (steps * batch), first

  crops_rate, crops_cpu_ms, (crops, colour) = rate(host_colour=False)
  host_colour_rate, _, _ = rate(host_colour=True)
  colour_step = tf.function(lambda crops, colour: [augment.apply_colour(c, d, spec) for c, d in zip(crops, colour)])
  colour_step(crops, colour)  # compiles
  repeats = 5
  start = time.perf_counter()
  for _ in range(repeats):
    outputs = colour_step(crops, colour)
  _ = [output.numpy() for output in outputs]
  step_ms = (time.perf_counter() - start) * 1000 / (repeats * batch)
  return {"crops": crops_rate, "crops_cpu_ms": crops_cpu_ms, "host_colour": host_colour_rate, "step_colour_ms": step_ms}


def project_rates(paths_file, cores, batch, epochs):
  """project_measurements in a child process pinned to cores 0..cores-1."""
  command = [sys.executable, "-m", "benchmarks.stream_speed", f"--child={cores}", f"--paths_file={paths_file}"]
  command += [f"--batch={batch}", f"--epochs={epochs}"]
  output = subprocess.run(
    command,
    cwd=ROOT,
    check=True,
    capture_output=True,
    text=True,
    preexec_fn=lambda: os.sched_setaffinity(0, set(range(cores))),
  ).stdout
  return json.loads(output.strip().splitlines()[-1])


def load_average():
  return os.getloadavg()[0]


def table(args, results, loads, machine, count):
  lines = [
    "# Streamed ImageNet input against the reference's Pillow chain",
    "",
    f"Machine: {machine}. Written by `python -m benchmarks.stream_speed "
    f"--images={args.images}{' --images_dir=...' if args.images_dir else ''} --cores={','.join(args.cores)} "
    f"--batch={args.batch} --epochs={args.epochs} --rounds={args.rounds}` on {datetime.date.today().isoformat()}; "
    f"1-minute load average during the run {min(loads):.1f} to {max(loads):.1f} (on {os.cpu_count()} cores; "
    f"this benchmark's own processes count up to {max(map(int, args.cores))}, more means other jobs shared the "
    "cores). Every row was measured in alternating rounds on the same cores (best round of each), so the ratios "
    "are the comparable part.",
    "",
    f"{count} {'of your' if args.images_dir else 'generated 500 x 375 px (4:2:0, quality 90)'} JPEGs; the ImageNet "
    f"views: 2 x {LARGE} px at area scale {LARGE_SCALE} and {MULTICROP} x {SMALL} px at {SMALL_SCALE} per image. "
    "Reference: Pillow, one process per core. Project host: utils/data/pipelines.streamed_views (decode once, "
    "crops, flips, colour draws); its colour stage runs in the train step (last column: its cost on these CPU "
    "cores, per image, batched and compiled). CPU ms per image: the processes' CPU time (all their threads) over "
    "the images, the least of the rounds; the inverse of images/s per core when the cores are fully used, and "
    "less sensitive than wall time to other jobs on the cores.",
    "",
    "| cores | reference, colour on (img/s) | reference, crops only | project host (img/s) | project host / "
    "reference (colour on) | CPU ms per image: reference, project host (ratio) | project with the colour on the "
    "host | colour in the step, CPU (ms/img) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for cores in args.cores:
    best = {name: max(values) for name, values in results[cores].items()}
    cpu = {name: min(results[cores][name]) for name in ("reference_cpu_ms", "crops_cpu_ms", "step_colour_ms")}
    lines.append(
      f"| {cores} | {best['reference']:.1f} | {best['reference_crops']:.1f} | {best['crops']:.1f} | "
      f"**{best['crops'] / best['reference']:.2f}x** | {cpu['reference_cpu_ms']:.1f}, {cpu['crops_cpu_ms']:.1f} "
      f"({cpu['reference_cpu_ms'] / cpu['crops_cpu_ms']:.2f}x) | {best['host_colour']:.1f} | "
      f"{cpu['step_colour_ms']:.1f} |"
    )
  first, last = args.cores[0], args.cores[-1]
  if first != last:
    scaling = max(results[last]["crops"]) / max(results[first]["crops"])
    reference_scaling = max(results[last]["reference"]) / max(results[first]["reference"])
    lines += ["", f"- {last} cores / {first}: project host {scaling:.2f}x, reference {reference_scaling:.2f}x."]
  lines.append(
    "- Per round (images/s): "
    + "; ".join(
      f"{cores} cores {name} " + " / ".join(f"{value:.0f}" for value in values)
      for cores in args.cores
      for name, values in results[cores].items()
      if not name.endswith("_ms")
    )
    + "."
  )
  return lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; settings are flags (--images=200)")
  args = flags.FLAGS
  if args.child:
    with open(args.paths_file) as file:
      paths = file.read().splitlines()
    print(json.dumps(project_measurements(paths, int(args.child), args.batch, args.epochs)))
    return
  from utils import devices

  if args.images_dir and not os.path.isdir(args.images_dir):
    raise app.UsageError(f"--images_dir={args.images_dir} is not a folder")
  with tempfile.TemporaryDirectory() as folder:
    paths = image_paths(args.images_dir) if args.images_dir else write_jpegs(folder, args.images)
    paths_file = os.path.join(folder, "paths.txt")
    with open(paths_file, "w") as file:
      file.write("\n".join(paths))
    results = {cores: {} for cores in args.cores}
    loads = [load_average()]
    for round_number in range(args.rounds):
      for cores in args.cores:
        n = int(cores)
        measured = dict(zip(("reference", "reference_cpu_ms"), reference_rate(paths, n, True, args.epochs)))
        measured["reference_crops"] = reference_rate(paths, n, False, args.epochs)[0]
        measured.update(project_rates(paths_file, n, args.batch, args.epochs))
        for name, value in measured.items():
          results[cores].setdefault(name, []).append(value)
        print(f"round {round_number + 1}, {n} cores: " + ", ".join(f"{k} {v:.1f}" for k, v in measured.items()))
        loads.append(load_average())
    lines = table(args, results, loads, devices.machine_description(), len(paths))
  os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
  with open(args.output, "w") as file:
    file.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
