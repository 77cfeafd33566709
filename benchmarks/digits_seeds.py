"""The digits demo over several label seeds, next to two baselines; writes misc/digits_results.md.

For each label seed: PAWS (the README's quick start: paws_train.py + fine_tune.py
+ nn_eval.py, timed; the pre-trained encoder is also evaluated, outside the
timing), the supervised-only baseline (fine_tune.py --from_scratch: the same
network trained with SuNCEt on the labeled images alone, with a from-scratch
schedule, BatchNorm statistics re-estimated on the clean labeled images) and
1-nearest-neighbour on raw pixels with the same labeled images.

The run of the preset's own label seed also refreshes the reference artefacts
in misc/ (config, labeled indices, logs, plots, eval.json, console log).

  python benchmarks/digits_seeds.py [--seeds 152 321 ...] [--precision auto] [--runs runs/seeds]
                                   [--output misc/digits_results.md] [--no-baselines]
                                   [--set pretrain.support_views=4 ...]

The table gives every seed, then mean, standard deviation, min and max of each column.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
from sklearn.neighbors import KNeighborsClassifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import config as presets  # pylint: disable=g-import-not-at-top
from utils import devices
from utils.data import datasets, splits

# From scratch, LARS needs the pre-training learning rates and far more than the
# 10 fine-tuning steps of the preset (there the network only adjusts).
SUPERVISED = ["--config.finetune.epochs=300", "--config.finetune.lr=3.2", "--config.finetune.final_lr=0.032"]
MISC = os.path.join(ROOT, "misc")
MISC_FILES = (
  "config.json",
  "labeled_indices.npy",
  "labeled_indices.txt",
  "pretrain_log.jsonl",
  "pretrain_loss.png",
  "eval.json",
  "confusion_matrix.png",
  "pca_projection.png",
  "finetuned/finetune_log.jsonl",
  "finetuned/finetune_loss.png",
)
# The five label seeds of the reference's CIFAR-10 split files, then ten more drawn once (not chosen by result).
DEFAULT_SEEDS = [152, 321, 401, 73, 91, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
PROGRESS = re.compile(r"(\d+)/(\d+) \[[=>.]*\]")


def run(*args, log=None):
  """Runs a script; returns its stdout (and appends it, without progress-bar redraws, to log)."""
  result = subprocess.run([sys.executable, *args], cwd=ROOT, check=True, capture_output=True, text=True)
  if log is not None:
    log.write(f"$ python {' '.join(args)}\n")
    for line in result.stdout.splitlines():
      bars = list(PROGRESS.finditer(line))
      if not bars:
        log.write(line + "\n")
      elif bars[-1].group(1) == bars[-1].group(2):  # keep each progress bar's final state only
        log.write(line[bars[-1].start() :] + "\n")
  return result.stdout


def top1(workdir):
  with open(os.path.join(workdir, "eval.json")) as f:
    return json.load(f)["top1"]


def refresh_misc(workdir, console_log):
  for name in MISC_FILES:
    shutil.copy(os.path.join(workdir, name), os.path.join(MISC, os.path.basename(name)))
  shutil.copy(console_log, os.path.join(MISC, "logs.txt"))


def results_table(rows, baselines):
  """Markdown table lines: one row per seed (seed, fine-tuned, pre-trained, seconds, supervised, pixels), then
  mean, sd, min and max; the supervised-only column only when the baselines ran."""
  columns = [
    ("PAWS top-1, fine-tuned (%)", ".2f"),
    ("PAWS top-1, pre-trained only (%)", ".2f"),
    ("wall time, 3 scripts (s)", ".0f"),
    ("supervised-only top-1 (%)", ".2f"),
    ("raw-pixel 1-NN top-1 (%)", ".2f"),
  ]
  kept = [i for i in range(len(columns)) if baselines or i != 3]  # 3: supervised-only
  values = np.array([r[1:] for r in rows])[:, kept]
  formats = [columns[i][1] for i in kept]

  def table_row(name, numbers):
    return f"| {name} | " + " | ".join(f"{x:{f}}" for x, f in zip(numbers, formats, strict=True)) + " |"

  lines = [
    "| label seed | " + " | ".join(columns[i][0] for i in kept) + " |",
    "|---" * (len(kept) + 1) + "|",
  ]
  lines += [table_row(r[0], values[k]) for k, r in enumerate(rows)]
  for name, reduce in (
    ("mean", np.mean),
    ("sd", lambda c, axis: np.std(c, axis=axis, ddof=1) if len(c) > 1 else np.full(c.shape[1], np.nan)),
    ("min", np.min),
    ("max", np.max),
  ):
    lines.append(table_row(f"**{name}**", reduce(values, axis=0)))
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=DEFAULT_SEEDS)
  parser.add_argument("--precision", default="auto", help="run.precision for all three scripts")
  parser.add_argument("--runs", default="runs/seeds")
  parser.add_argument("--output", default=os.path.join(MISC, "digits_results.md"))
  parser.add_argument(
    "--no-baselines",
    dest="baselines",
    action="store_false",
    help="skip the supervised-only baseline (the slowest part)",
  )
  parser.add_argument(
    "--set",
    nargs="+",
    default=[],
    metavar="FIELD=VALUE",
    help="config overrides for all three scripts, to compare a candidate recipe with the preset",
  )
  args = parser.parse_args()
  overrides = [f"--config.{item}" for item in args.set]
  os.makedirs(args.runs, exist_ok=True)
  default_seed = presets.get_config("digits").data.label_seed
  train_images, train_labels, test_images, test_labels = datasets.load_digits()
  rows = []
  for seed in args.seeds:
    config = [
      "--config=config.py:digits",
      f"--config.data.label_seed={seed}",
      f"--config.run.precision={args.precision}",
      *overrides,
    ]
    paws_dir = os.path.join(args.runs, f"paws_{seed}")
    shutil.rmtree(paws_dir, ignore_errors=True)
    console_log = os.path.join(args.runs, f"paws_{seed}.log")
    with open(console_log, "w") as log:
      start = time.time()
      run("paws_train.py", *config, f"--workdir={paws_dir}", log=log)
      pretrain_seconds = time.time() - start
      run("nn_eval.py", *config, f"--workdir={paws_dir}", "--encoder=pretrained")
      pretrained = top1(paws_dir)
      start_rest = time.time()
      run("fine_tune.py", *config, f"--workdir={paws_dir}", log=log)
      run("nn_eval.py", *config, f"--workdir={paws_dir}", log=log)
      seconds = pretrain_seconds + time.time() - start_rest
    if seed == default_seed and not overrides and args.output == os.path.join(MISC, "digits_results.md"):
      refresh_misc(paws_dir, console_log)
    supervised = float("nan")
    if args.baselines:
      supervised_dir = os.path.join(args.runs, f"supervised_{seed}")
      shutil.rmtree(supervised_dir, ignore_errors=True)
      run("fine_tune.py", *config, *SUPERVISED, f"--workdir={supervised_dir}", "--from_scratch")
      run("nn_eval.py", *config, *SUPERVISED, f"--workdir={supervised_dir}")
      supervised = top1(supervised_dir)
    with open(os.path.join(paws_dir, "config.json")) as f:
      saved = json.load(f)  # the run's resolved config, --set overrides included
    precision = saved["run"]["precision"]
    labeled = splits.select_labeled_indices(train_labels, saved["data"]["labeled_per_class"], seed)
    nearest = KNeighborsClassifier(1).fit(train_images[labeled].reshape(len(labeled), -1), train_labels[labeled])
    pixels = 100 * np.mean(nearest.predict(test_images.reshape(len(test_images), -1)) == test_labels)
    rows.append((seed, top1(paws_dir), pretrained, seconds, supervised, pixels))
    print(rows[-1], flush=True)
  lines = results_table(rows, args.baselines)
  machine = devices.machine_description()
  text = (
    f"# Digits demo over label seeds\n\nMachine: {machine}; run.precision={args.precision} "
    f"(resolved: {precision}). Written by `python benchmarks/digits_seeds.py --seeds "
    f"{' '.join(map(str, args.seeds))} --precision {args.precision}"
    f"{' --set ' + ' '.join(args.set) if args.set else ''}{'' if args.baselines else ' --no-baselines'}` "
    f"on {time.strftime('%Y-%m-%d')}.\n\n"
    "PAWS = the README's quick start with the label seed changed. "
    + (
      f"Supervised-only = `fine_tune.py --from_scratch {' '.join(SUPERVISED)}`: the same network trained "
      "with SuNCEt on the labeled images alone (no augmentation: the digits preset has no flip), "
      "BatchNorm statistics re-estimated on them. "
      if args.baselines
      else ""
    )
    + "Raw-pixel 1-NN uses the same labeled images. "
    "sd is the sample standard deviation over the seeds.\n\n" + "\n".join(lines) + "\n"
  )
  with open(args.output, "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
