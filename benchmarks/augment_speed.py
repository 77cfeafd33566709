"""Throughput of utils/augment.py in a tf.data pipeline, in crops per second.

One element = the PAWS unlabeled views of a 256-image uint8 32x32 batch
(SPEC 4): 2 views at 32 px, scale (0.75, 1), and 6 views at 18 px, scale
(0.3, 0.75), all with full colour distortion. The target is >= 15 000 crops/s
on 2 CPU cores.

  python benchmarks/augment_speed.py [--steps 40] [--stack_views]

Measured on the 2-core development machine (otherwise idle): about 26 000
crops/s with one augment_batch call per view, 25 000 with --stack_views.
"""
import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf

from utils import augment

BATCH_SIZE = 256
LARGE_VIEWS, LARGE_SIZE, LARGE_SCALE = 2, 32, (0.75, 1.0)
SMALL_VIEWS, SMALL_SIZE, SMALL_SCALE = 6, 18, (0.3, 0.75)
CROPS_PER_ELEMENT = BATCH_SIZE * (LARGE_VIEWS + SMALL_VIEWS)


def make_views(images, seed, stack_views):
  """All 8 views of one batch: one augment_batch call per view or per size."""
  large_seed, small_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))
  if not stack_views:
    large = [augment.augment_batch(images, view_seed, LARGE_SIZE, LARGE_SCALE)
             for view_seed in tf.unstack(tf.random.experimental.stateless_split(
                 large_seed, LARGE_VIEWS))]
    small = [augment.augment_batch(images, view_seed, SMALL_SIZE, SMALL_SCALE)
             for view_seed in tf.unstack(tf.random.experimental.stateless_split(
                 small_seed, SMALL_VIEWS))]
    return tuple(large), tuple(small)
  # The views of one size stacked into one batch: fewer, larger calls; every
  # row still gets its own random draws.
  large = augment.augment_batch(tf.tile(images, [LARGE_VIEWS, 1, 1, 1]),
                                large_seed, LARGE_SIZE, LARGE_SCALE)
  small = augment.augment_batch(tf.tile(images, [SMALL_VIEWS, 1, 1, 1]),
                                small_seed, SMALL_SIZE, SMALL_SCALE)
  return large, small


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--stack_views", action="store_true",
                      help="one augment_batch call per view size, not per view")
  args = parser.parse_args()

  images = np.random.default_rng(0).integers(
      0, 256, size=(BATCH_SIZE, 32, 32, 3), dtype=np.uint8)
  seeds = tf.data.Dataset.range(args.warmup + args.steps).map(
      lambda step: tf.stack([tf.constant(0, tf.int64), step]))
  dataset = tf.data.Dataset.zip(
      (tf.data.Dataset.from_tensors(images).repeat(), seeds))
  dataset = dataset.map(
      lambda batch, seed: make_views(batch, seed, args.stack_views),
      num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

  iterator = iter(dataset)
  for _ in range(args.warmup):
    next(iterator)
  start, start_cpu = time.perf_counter(), time.process_time()
  for _ in range(args.steps):
    next(iterator)
  elapsed = time.perf_counter() - start
  cpu_seconds = time.process_time() - start_cpu
  crops = args.steps * CROPS_PER_ELEMENT
  # Other jobs on a shared machine lower the wall-clock rate; crops per CPU
  # second times the core count estimates the rate on otherwise idle cores.
  cores = len(os.sched_getaffinity(0))
  print(f"stack_views: {args.stack_views}  steps: {args.steps}  "
        f"wall: {crops / elapsed:.0f} crops/s  "
        f"CPU: {crops / cpu_seconds:.0f} crops per CPU-second "
        f"(x {cores} cores = {cores * crops / cpu_seconds:.0f} crops/s "
        f"if the cores were idle)  load average: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
