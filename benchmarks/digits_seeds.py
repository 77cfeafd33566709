"""The digits demo over several label seeds, next to two baselines; writes misc/digits_results.md.

For each label seed: PAWS (paws_train.py + fine_tune.py + nn_eval.py, timed),
the supervised-only baseline (fine_tune.py --from_scratch + nn_eval.py: the same
network trained with SuNCEt on the 40 labeled images alone) and 1-nearest-
neighbour on raw pixels with the same labeled images.

  python benchmarks/digits_seeds.py [--seeds 152 321 401] [--runs runs/seeds]
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np
from sklearn.neighbors import KNeighborsClassifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from utils import datasets  # pylint: disable=g-import-not-at-top


def run(*args):
  subprocess.run([sys.executable, *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def top1(workdir):
  with open(os.path.join(workdir, "eval.json")) as f:
    return json.load(f)["top1"]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[152, 321, 401])
  parser.add_argument("--runs", default="runs/seeds")
  args = parser.parse_args()
  train_images, train_labels, test_images, test_labels = datasets.load_digits()
  rows = []
  for seed in args.seeds:
    config = ["--config=config.py:digits", f"--config.data.label_seed={seed}"]
    paws_dir = os.path.join(args.runs, f"paws_{seed}")
    start = time.time()
    for script in ("paws_train.py", "fine_tune.py", "nn_eval.py"):
      run(script, *config, f"--workdir={paws_dir}")
    seconds = time.time() - start
    supervised_dir = os.path.join(args.runs, f"supervised_{seed}")
    run("fine_tune.py", *config, f"--workdir={supervised_dir}", "--from_scratch")
    run("nn_eval.py", *config, f"--workdir={supervised_dir}")
    labeled = datasets.select_labeled_indices(train_labels, 4, seed)
    nearest = KNeighborsClassifier(1).fit(train_images[labeled].reshape(len(labeled), -1), train_labels[labeled])
    pixels = 100 * np.mean(nearest.predict(test_images.reshape(len(test_images), -1)) == test_labels)
    rows.append((seed, top1(paws_dir), seconds, top1(supervised_dir), pixels))
    print(rows[-1], flush=True)
  columns = np.array([r[1:] for r in rows])
  lines = ["| label seed | PAWS top-1 (%) | PAWS wall time, 3 scripts (s) | supervised-only top-1 (%) | raw-pixel 1-NN top-1 (%) |",
           "|---|---|---|---|---|"]
  lines += [f"| {r[0]} | {r[1]:.2f} | {r[2]:.0f} | {r[3]:.2f} | {r[4]:.2f} |" for r in rows]
  lines.append(f"| mean | {columns[:, 0].mean():.2f} | {columns[:, 1].mean():.0f} | {columns[:, 2].mean():.2f} | {columns[:, 3].mean():.2f} |")
  machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
  text = (f"# Digits demo over label seeds\n\nMachine: {machine}, no GPU. Written by "
          f"`python benchmarks/digits_seeds.py`.\n\n" + "\n".join(lines) + "\n")
  with open(os.path.join(ROOT, "misc", "digits_results.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
