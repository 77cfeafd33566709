"""The digits demo over several label seeds, next to two baselines; writes misc/digits_results.md.

For each label seed: PAWS (the README's quick start: paws_train.py + fine_tune.py
+ nn_eval.py, timed; the pre-trained encoder is also evaluated, outside the
timing), the supervised-only baseline (fine_tune.py --from_scratch: the same
network trained with SuNCEt on the labeled images alone, with a from-scratch
schedule, BatchNorm statistics re-estimated on the clean labeled images) and
1-nearest-neighbour on raw pixels with the same labeled images. Beside each PAWS
soft-NN top-1 (fine-tuned and pre-trained encoder), the weighted k-NN and
linear-probe top-1 that nn_eval.py reports on the same embeddings (eval.json).

The run of the preset's own label seed also refreshes the reference artefacts
in misc/ (config, labeled indices, logs, plots, eval.json, console log).

  python -m benchmarks.digits_seeds [--config=config.py:digits] [--config.FIELD=VALUE ...]
                                    [--seeds=152,321,...] [--runs=runs/seeds] [--output=misc/digits_results.md]
                                    [--nobaselines]

from the repository root. --config and its overrides are the entry scripts' and go to all three of them,
each run with --config.data.label_seed=SEED added: e.g. --config.run.precision=float32, or
--config.pretrain.support_views=4 to compare a candidate recipe with the preset.

The table gives every seed, then mean, standard deviation, min and max of each column.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time

from absl import app, flags
import numpy as np
from sklearn.neighbors import KNeighborsClassifier

from utils import cli, devices
from utils.data import datasets, splits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS

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


def define_flags():
  """The command line (when run as a program; importing this module, as the tests do, defines no flags)."""
  cli.define_config_flag("config.py:digits")
  flags.DEFINE_list("seeds", [str(seed) for seed in DEFAULT_SEEDS], "Label seeds, comma-separated.")
  flags.register_validator(
    "seeds", lambda seeds: bool(seeds) and all(re.fullmatch(r"\d+", s) for s in seeds), "must be integers >= 0"
  )
  flags.DEFINE_string("runs", "runs/seeds", "Folder of the runs' workdirs and console logs.")
  flags.DEFINE_string("output", os.path.join(MISC, "digits_results.md"), "Markdown file written.")
  flags.DEFINE_bool("baselines", True, "Run the supervised-only baseline (the slowest part); --nobaselines skips it.")


def config_arguments():
  """(--config=FILE:PRESET, [--config.FIELD=VALUE overrides]) as given on this command line."""
  flag = FLAGS["config"]
  return f"--config={flag.config_filename}", [f"--config.{k}={v}" for k, v in flag.override_values.items()]


def run(script, *args, log=None):
  """Runs an entry script (in this process's working directory, as the paths given to it are relative to it);
  returns its stdout (and appends it, without progress-bar redraws, to log)."""
  result = subprocess.run(
    [sys.executable, os.path.join(ROOT, script), *args], check=True, capture_output=True, text=True
  )
  if log is not None:
    log.write(f"$ python {' '.join([script, *args])}\n")
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


def knn_and_linear_probe(workdir):
  """(k-NN top-1, linear-probe top-1) of the workdir's eval.json; NaN for one nn_eval.py did not report."""
  with open(os.path.join(workdir, "eval.json")) as f:
    result = json.load(f)
  return result.get("knn_top1", float("nan")), result.get("linear_probe_top1", float("nan"))


def refresh_misc(workdir, console_log):
  for name in MISC_FILES:
    shutil.copy(os.path.join(workdir, name), os.path.join(MISC, os.path.basename(name)))
  shutil.copy(console_log, os.path.join(MISC, "logs.txt"))


# (title, format) of the values of a results row after the seed, in the row's order; the table shows them in
# TABLE_ORDER (the evaluations of each encoder side by side).
COLUMNS = [
  ("PAWS top-1, fine-tuned (%)", ".2f"),
  ("PAWS top-1, pre-trained only (%)", ".2f"),
  ("wall time, 3 scripts (s)", ".0f"),
  ("supervised-only top-1 (%)", ".2f"),
  ("raw-pixel 1-NN top-1 (%)", ".2f"),
  ("k-NN top-1, fine-tuned (%)", ".2f"),
  ("linear-probe top-1, fine-tuned (%)", ".2f"),
  ("k-NN top-1, pre-trained only (%)", ".2f"),
  ("linear-probe top-1, pre-trained only (%)", ".2f"),
]
TABLE_ORDER = [0, 1, 5, 6, 7, 8, 2, 3, 4]
SUPERVISED_COLUMN = 3
KNN_AND_LINEAR_PROBE_COLUMNS = (5, 6, 7, 8)


def results_table(rows, baselines):
  """Markdown table lines: one row per seed, then mean, sd, min and max.

  A row is (seed, fine-tuned, pre-trained, seconds, supervised, pixels[, k-NN fine-tuned, linear probe
  fine-tuned, k-NN pre-trained, linear probe pre-trained]): values missing at the end are NaN. The
  supervised-only column is shown only when the baselines ran, a k-NN or linear-probe column only when some
  seed has a number in it (an eval.json written without them has none)."""
  values = np.array([tuple(r[1:]) + (float("nan"),) * (len(COLUMNS) + 1 - len(r)) for r in rows], dtype=float)
  kept = [
    i
    for i in TABLE_ORDER
    if (baselines or i != SUPERVISED_COLUMN)
    and not (i in KNN_AND_LINEAR_PROBE_COLUMNS and np.all(np.isnan(values[:, i])))
  ]
  values = values[:, kept]
  formats = [COLUMNS[i][1] for i in kept]

  def table_row(name, numbers):
    return f"| {name} | " + " | ".join(f"{x:{f}}" for x, f in zip(numbers, formats, strict=True)) + " |"

  lines = [
    "| label seed | " + " | ".join(COLUMNS[i][0] for i in kept) + " |",
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; settings are flags (--seeds=152,321)")
  preset, overrides = config_arguments()
  seeds = [int(seed) for seed in FLAGS.seeds]
  # The run of the preset's own label seed refreshes misc/ when nothing but the precision is changed.
  reference = FLAGS.config.name == "digits" and all(o.startswith("--config.run.precision=") for o in overrides)
  reference = reference and FLAGS.output == os.path.join(MISC, "digits_results.md")
  os.makedirs(FLAGS.runs, exist_ok=True)
  default_seed = FLAGS.config.data.label_seed
  train_images, train_labels, test_images, test_labels = datasets.load_digits()
  rows = []
  for seed in seeds:
    config = [preset, *overrides, f"--config.data.label_seed={seed}"]
    paws_dir = os.path.join(FLAGS.runs, f"paws_{seed}")
    shutil.rmtree(paws_dir, ignore_errors=True)
    console_log = os.path.join(FLAGS.runs, f"paws_{seed}.log")
    with open(console_log, "w") as log:
      start = time.time()
      run("paws_train.py", *config, f"--workdir={paws_dir}", log=log)
      pretrain_seconds = time.time() - start
      run("nn_eval.py", *config, f"--workdir={paws_dir}", "--encoder=pretrained")
      pretrained = top1(paws_dir)
      pretrained_knn_and_probe = knn_and_linear_probe(paws_dir)
      start_rest = time.time()
      run("fine_tune.py", *config, f"--workdir={paws_dir}", log=log)
      run("nn_eval.py", *config, f"--workdir={paws_dir}", log=log)
      seconds = pretrain_seconds + time.time() - start_rest
    if seed == default_seed and reference:
      refresh_misc(paws_dir, console_log)
    supervised = float("nan")
    if FLAGS.baselines:
      supervised_dir = os.path.join(FLAGS.runs, f"supervised_{seed}")
      shutil.rmtree(supervised_dir, ignore_errors=True)
      run("fine_tune.py", *config, *SUPERVISED, f"--workdir={supervised_dir}", "--from_scratch")
      run("nn_eval.py", *config, *SUPERVISED, f"--workdir={supervised_dir}")
      supervised = top1(supervised_dir)
    with open(os.path.join(paws_dir, "config.json")) as f:
      saved = json.load(f)  # the run's resolved config, --config overrides included
    precision = saved["run"]["precision"]
    labeled = splits.select_labeled_indices(train_labels, saved["data"]["labeled_per_class"], seed)
    nearest = KNeighborsClassifier(1).fit(train_images[labeled].reshape(len(labeled), -1), train_labels[labeled])
    pixels = 100 * np.mean(nearest.predict(test_images.reshape(len(test_images), -1)) == test_labels)
    rows.append(
      (seed, top1(paws_dir), pretrained, seconds, supervised, pixels)
      + knn_and_linear_probe(paws_dir)
      + pretrained_knn_and_probe
    )
    print(rows[-1], flush=True)
  lines = results_table(rows, FLAGS.baselines)
  machine = devices.machine_description()
  text = (
    f"# Digits demo over label seeds\n\nMachine: {machine}; run.precision={FLAGS.config.run.precision} "
    f"(resolved: {precision}). Written by `python -m benchmarks.digits_seeds {' '.join([preset, *overrides])} "
    f"--seeds={','.join(map(str, seeds))}{'' if FLAGS.baselines else ' --nobaselines'}` "
    f"on {time.strftime('%Y-%m-%d')}.\n\n"
    "PAWS = the README's quick start with the label seed changed. "
    + (
      f"Supervised-only = `fine_tune.py --from_scratch {' '.join(SUPERVISED)}`: the same network trained "
      "with SuNCEt on the labeled images alone (no augmentation: the digits preset has no flip), "
      "BatchNorm statistics re-estimated on them. "
      if FLAGS.baselines
      else ""
    )
    + "Raw-pixel 1-NN uses the same labeled images. "
    "k-NN and linear probe: `nn_eval.py`'s other evaluations of the same encoder and embeddings as its soft-NN "
    "(weighted k-NN, cosine, eval.knn_k nearest labeled images, weights exp(similarity / eval.knn_temperature); "
    "scikit-learn logistic regression on the labeled images' L2-normalised embeddings). "
    "sd is the sample standard deviation over the seeds.\n\n" + "\n".join(lines) + "\n"
  )
  with open(FLAGS.output, "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  define_flags()
  cli.run_script(main)
