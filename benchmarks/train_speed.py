"""Speed of PAWS pre-training on this machine; writes misc/speed.md.

Measures, at the paper's CIFAR-10 shapes reduced to 32 unlabeled images and
10 classes x 8 support images x 2 views per step (WRN-28-2; 2 x 32 px and
6 x 18 px views: 416 crops per step):
  * the PAWS train step (forward, PAWS loss, LARS update) compiled with
    tf.function, with XLA, and run eagerly, in float32 and mixed_bfloat16;
  * a plain tf.function forward+backward of the encoder on the same crops (no
    loss, no optimizer): the floor the train step should stay close to;
  * the input pipeline (utils/data/pipelines.pretrain_dataset, full colour
    distortion) at the paper's full batch: 256 images x 8 views + 1280 supports;
  * the PAWS train step of the ImageNet model (ResNet-50, 2048-d heads) at a small batch: 4 unlabeled
    images x (2 x 224 px + 6 x 96 px views) + 15 classes x 1 support at 224 px (47 crops per step), in
    float32, and in mixed_bfloat16 only on CPUs with AMX (utils/devices.cpu_has_amx).
Each measurement runs in a fresh process: the precision policy is process-wide.

  python -m benchmarks.train_speed [--steps=10] [--only=compiled:float32,pipeline:float32]
                                   [--output=misc/speed.md]

from the repository root. The shapes are fixed (the cifar10 preset, reduced as above): no --config.
"""

import os
import subprocess
import sys
import time

from absl import app, flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported (here and in the children)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEASUREMENTS = [  # (what, precision)
  ("compiled", "float32"),
  ("compiled", "mixed_bfloat16"),
  ("xla", "float32"),
  ("xla", "mixed_bfloat16"),
  ("eager", "float32"),
  ("eager", "mixed_bfloat16"),
  ("forward_backward", "float32"),
  ("forward_backward", "mixed_bfloat16"),
  ("pipeline", "float32"),
  ("resnet50", "float32"),
  ("resnet50", "mixed_bfloat16"),  # skipped without AMX
]
DESCRIPTIONS = {
  "compiled": "PAWS train step, tf.function",
  "xla": "PAWS train step, tf.function + XLA",
  "eager": "PAWS train step, eager",
  "forward_backward": "encoder forward+backward only, tf.function",
  "pipeline": "input pipeline (full paper batch)",
  "resnet50": "ResNet-50 PAWS train step, tf.function (ImageNet shapes, small batch)",
}
RESNET50_UNLABELED = 4  # unlabeled images per ResNet-50 step


def _measurement(item):
  """`WHAT:PRECISION` -> (what, precision), or None if it names no row of MEASUREMENTS."""
  pair = tuple(item.split(":"))
  return pair if pair in MEASUREMENTS else None


_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per measurement.", lower_bound=1)
_OUTPUT = flags.DEFINE_string("output", os.path.join(ROOT, "misc", "speed.md"), "Markdown file written.")
_ONLY = flags.DEFINE_list(
  "only",
  None,
  "Measure only these rows, e.g. compiled:float32,pipeline:float32 (default: all): "
  + ", ".join(f"{what}:{precision}" for what, precision in MEASUREMENTS),
)
_ONE = flags.DEFINE_string("one", None, "Internal: one WHAT:PRECISION measurement in this process, for the parent.")
flags.register_validator(
  "only", lambda items: items is None or all(map(_measurement, items)), "each item must be a WHAT:PRECISION row"
)
flags.register_validator("one", lambda item: item is None or _measurement(item), "must be a WHAT:PRECISION row")


def reduced_config(precision):
  import config as presets  # the repository's config.py

  config = presets.get_config("cifar10")
  config.pretrain.batch_size = 32
  config.pretrain.images_per_class = 8
  config.run.precision = precision
  return config


def resnet50_config(precision):
  """The ImageNet model and view sizes at a batch a CPU can step: 4 images, 15 classes x 1 support."""
  config = reduced_config(precision)
  m, d, p = config.model, config.data, config.pretrain
  m.name, m.hidden_dim, m.projection_dim = "resnet50", 2048, 2048
  m.prediction_head, m.prediction_hidden_dim = True, 512
  d.image_size, d.large_crop_size, d.small_crop_size = 224, 224, 96
  p.batch_size, p.multicrop = RESNET50_UNLABELED, 6
  p.classes_per_batch, p.images_per_class, p.support_views = 15, 1, 1
  return config


def time_forward_backward(config, num_steps):
  """Seconds per tf.function forward+backward of the encoder on the train step's crop groups."""
  import tensorflow as tf

  from utils.model import encoder as encoder_lib

  p = config.pretrain
  large, small = config.data.large_crop_size, config.data.small_crop_size
  num_support = p.support_views * p.images_per_class * p.classes_per_batch
  large_batch = tf.random.normal([num_support + 2 * p.batch_size, large, large, 3])
  small_batch = tf.random.normal([p.multicrop * p.batch_size, small, small, 3])
  encoder = encoder_lib.build_encoder(config.model, config.data.image_size)

  @tf.function
  def step():
    with tf.GradientTape() as tape:
      h, _ = encoder_lib.embed_views(encoder, [[large_batch], [small_batch]], training=True)
      total = tf.reduce_sum(tf.cast(h, tf.float32))
    return tape.gradient(total, encoder.trainable_variables)

  step()
  start = time.perf_counter()
  for _ in range(num_steps):
    gradients = step()
  float(gradients[0][0, 0, 0, 0])
  return (time.perf_counter() - start) / num_steps


def time_pipeline(num_steps):
  """Seconds per element of the pre-training input pipeline at the paper's full batch."""
  import numpy as np

  import config as presets
  from utils.data import pipelines, sampling

  c = presets.get_config("cifar10")
  p, d = c.pretrain, c.data
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=[4096, 32, 32, 3], dtype=np.uint8)
  labels = np.arange(4096) % 10
  labeled = np.arange(4000)  # 400 per class
  plan = sampling.PawsPlan(labeled, labels, len(images), p, 0, 1)
  dataset = pipelines.pretrain_dataset(images, plan, d, p, start_step=0, total_steps=num_steps + 3)
  iterator = iter(dataset)
  for _ in range(3):
    next(iterator)
  start = time.perf_counter()
  for _ in range(num_steps):
    next(iterator)
  return (time.perf_counter() - start) / num_steps


def measure(what, precision, num_steps):
  """Returns (seconds per step, crops per step) for one measurement."""
  import tensorflow as tf

  from utils import devices
  from utils.train import benchmark

  if what == "pipeline":
    import config as presets

    return time_pipeline(num_steps), benchmark.crops_per_step(presets.get_config("cifar10").pretrain)
  config = resnet50_config(precision) if what == "resnet50" else reduced_config(precision)
  devices.set_precision(config)
  crops = benchmark.crops_per_step(config.pretrain)
  if what == "forward_backward":
    return time_forward_backward(config, num_steps), crops
  if what == "eager":
    tf.config.run_functions_eagerly(True)
  strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
  return benchmark.time_train_steps(config, strategy, what == "xla", num_steps), crops


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; settings are flags (--steps=10)")
  if _ONE.value:  # child process: one measurement, printed for the parent
    seconds, crops = measure(*_measurement(_ONE.value), _STEPS.value)
    print(f"RESULT {seconds} {crops}")
    return
  rows = {}
  from utils import devices
  from utils.devices import machine_description

  chosen = [_measurement(item) for item in _ONLY.value] if _ONLY.value else MEASUREMENTS
  for what, precision in chosen:
    if what == "resnet50" and precision == "mixed_bfloat16" and not devices.cpu_has_amx():
      continue  # as run.precision=auto: bf16 only with AMX (utils/devices.resolve_precision)
    result = subprocess.run(
      [sys.executable, "-m", "benchmarks.train_speed", f"--one={what}:{precision}", f"--steps={_STEPS.value}"],
      cwd=ROOT,
      capture_output=True,
      text=True,
      check=True,
    )
    seconds, crops = result.stdout.split("RESULT ")[1].split()
    rows[what, precision] = (float(seconds), int(crops))
    print(
      f"{DESCRIPTIONS[what]}, {precision}: {1 / float(seconds):.2f} steps/s, {int(crops) / float(seconds):.0f} crops/s",
      flush=True,
    )
  lines = ["| measurement | precision | steps/s | crops/s | ms/step |", "|---|---|---|---|---|"]
  for (what, precision), (seconds, crops) in rows.items():
    shown_precision = "-" if what == "pipeline" else precision
    lines.append(
      f"| {DESCRIPTIONS[what]} | {shown_precision} | {1 / seconds:.2f} | {crops / seconds:.0f} | {1000 * seconds:.0f} |"
    )
  seconds = {key: value[0] for key, value in rows.items()}
  ratios = [  # (note, numerator row, denominator row): shown when both rows were measured
    ("mixed_bfloat16 over float32, compiled step", ("compiled", "float32"), ("compiled", "mixed_bfloat16"), "x"),
    ("compiled float32 step / plain forward+backward", ("compiled", "float32"), ("forward_backward", "float32"), ""),
    ("compiled over eager, float32", ("eager", "float32"), ("compiled", "float32"), "x"),
  ]
  notes = [
    f"- {note}: {seconds[top] / seconds[bottom]:.2f}{unit}"
    for note, top, bottom, unit in ratios
    if top in seconds and bottom in seconds
  ]
  notes += [
    f"- ResNet-50 step, {precision}: {RESNET50_UNLABELED / seconds:.2f} unlabeled images/s"
    for (what, precision), (seconds, _) in rows.items()
    if what == "resnet50"
  ]

  text = (
    f"# Pre-training speed\n\nMachine: {machine_description()}. Written by `python -m benchmarks.train_speed "
    f"--steps={_STEPS.value}{' --only=' + ','.join(_ONLY.value) if _ONLY.value else ''}` on "
    f"{time.strftime('%Y-%m-%d')}, "
    "machine otherwise idle.\n\n"
    "Train-step rows: WRN-28-2, 32 unlabeled images x (2 x 32 px + 6 x 18 px views) + "
    "10 classes x 8 supports x 2 views = 416 crops per step. Pipeline row: the paper's full batch "
    "(256 x 8 views + 1280 supports = 3328 crops per step) with full colour distortion. ResNet-50 rows: "
    "the ImageNet model (ResNet-50, heads 2048-2048-2048 and 2048-512-2048), 4 unlabeled images x "
    "(2 x 224 px + 6 x 96 px views) + 15 classes x 1 support at 224 px = 47 crops per step.\n\n"
    + "\n".join(lines)
    + "\n\n"
    + "\n".join(notes)
    + "\n"
  )
  with open(_OUTPUT.value, "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  app.run(main)
