"""The ImageNet recipe end to end on a tiny ImageNet-like folder, through the three scripts.

config.py:imagenet shrunk by overrides (small crops and trunk, one step per epoch), on two logical CPU
replicas so that each draws its own support classes (pretrain.unique_classes_per_replica), with an
unbalanced labeled subset given as a file of ImageNet-style names (the reference's 1 % / 10 % lists).
"""

import json
import os

import numpy as np
from PIL import Image
import pytest

from tests import scriptrun

CLASSES = [f"n0{1440764 + 7 * label}" for label in range(6)]  # WordNet-style ids, sorted
LABELED_PER_CLASS = [2, 2, 2, 2, 1, 1]  # unbalanced, as 128 116 images over 1000 classes are
SHRINK = [
  "--config=config.py:imagenet",
  "--config.data.dataset=folder",
  "--config.data.labeled_per_class=0",  # the split file decides
  "--config.data.image_size=32",
  "--config.data.large_crop_size=32",
  "--config.data.small_crop_size=16",
  "--config.model.name=wrn",
  "--config.model.depth=10",
  "--config.model.width=1",
  "--config.model.hidden_dim=32",
  "--config.model.projection_dim=32",
  "--config.model.prediction_hidden_dim=16",
  "--config.pretrain.batch_size=24",  # the 24 training images: one step per epoch
  "--config.pretrain.multicrop=2",
  "--config.pretrain.classes_per_batch=2",  # x 2 replicas = 4 of the 6 classes per step
  "--config.pretrain.images_per_class=2",  # 1 per class on each replica
  "--config.pretrain.epochs=2",
  "--config.pretrain.warmup_epochs=1",
  "--config.finetune.batch_size=10",  # the 10 labeled images: one step per epoch
  "--config.finetune.epochs=2",
  "--config.eval.batch_size=8",
  "--config.run.cpu_replicas=2",
  "--config.run.log_every=1",
]


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
  """ROOT/train/<wnid>/<wnid>_<n>.JPEG (4 per class, sizes 28-70 px, both orientations), ROOT/val, a split file."""
  root = tmp_path_factory.mktemp("imagenet")
  rng = np.random.default_rng(0)
  names = []
  for label, wnid in enumerate(CLASSES):
    for split, count in (("train", 4), ("val", 1)):
      os.makedirs(root / split / wnid)
      for number in range(count):
        height, width = rng.integers(28, 71, size=2)
        base = rng.integers(0, 256, 3)  # a colour per class, plus noise
        pixels = np.clip(base + rng.normal(0, 30, (height, width, 3)), 0, 255).astype(np.uint8)
        name = f"{wnid}_{label * 100 + number}.JPEG"
        Image.fromarray(pixels).save(root / split / wnid / name, quality=90)
        if split == "train" and number < LABELED_PER_CLASS[label]:
          names.append(name)
  split_file = root / "subset.txt"
  split_file.write_text("".join(f"{name}\n" for name in names))
  # The reference's imagenet_subsets/val.txt: training images outside the labeled subset (here the other 14).
  heldout = [f"{wnid}_{label * 100 + number}.JPEG" for label, wnid in enumerate(CLASSES) for number in range(4)]
  (root / "heldout.txt").write_text("".join(f"{name}\n" for name in heldout if name not in names))
  (root / "overlapping.txt").write_text("".join(f"{name}\n" for name in heldout))
  return str(root), str(split_file), names


def test_imagenet_recipe_through_the_three_scripts(imagenet_like, tmp_path):
  root, split_file, names = imagenet_like
  workdir = str(tmp_path / "run")
  flags = [*SHRINK, f"--data_dir={root}", f"--workdir={workdir}"]
  pretrain = scriptrun.run("paws_train.py", *flags, f"--split_file={split_file}", timeout=900)
  assert pretrain.returncode == 0, pretrain.stderr[-3000:]
  assert "24 training images in 6 classes" in pretrain.stdout
  with open(os.path.join(workdir, "labeled_files.txt")) as file:
    assert sorted(os.path.basename(line) for line in file.read().split()) == sorted(names)
  with open(os.path.join(workdir, "pretrain_log.jsonl")) as file:
    log = [json.loads(line) for line in file]
  assert {entry["step"] for entry in log} == {1, 2} and all(np.isfinite(entry["loss"]) for entry in log)

  # Held-out selection (the reference's ImageNet fine-tuning): 3 epochs, the best epoch's classifier kept.
  overlapping = scriptrun.run("fine_tune.py", *flags, f"--heldout_split_file={root}/overlapping.txt")
  assert overlapping.returncode == 2
  assert "holds 10 image(s) of the labeled subset" in scriptrun.error_line(overlapping)
  heldout = f"--heldout_split_file={root}/heldout.txt"
  finetune = scriptrun.run("fine_tune.py", *flags, heldout, "--config.finetune.epochs=3", timeout=900)
  assert finetune.returncode == 0, finetune.stderr[-3000:]
  with open(os.path.join(workdir, "finetuned", "finetune_log.jsonl")) as file:
    epochs = [record for record in map(json.loads, file) if record["kind"] == "epoch"]
  values = [record["heldout_top1"] for record in epochs]
  assert [record["epoch"] for record in epochs] == [1, 2, 3] and all(0 <= value <= 100 for value in values)
  with open(os.path.join(workdir, "finetuned", "classifier.json")) as file:
    meta = json.load(file)
  best = int(np.argmax(values)) + 1  # the first best: a later tie does not replace it
  assert (meta["selected_epoch"], meta["heldout_top1"], meta["heldout_images"]) == (best, max(values), 14)
  assert meta["finetune_step"] == best  # one step per epoch
  assert f"classifier of epoch {best} (held-out top-1 {max(values):.2f} %) saved" in finetune.stdout

  evaluate = scriptrun.run("nn_eval.py", *flags, timeout=900)
  assert evaluate.returncode == 0, evaluate.stderr[-3000:]
  with open(os.path.join(workdir, "eval.json")) as file:
    metrics = json.load(file)
  assert metrics["num_support"] == len(names) and metrics["num_test"] == len(CLASSES)
  assert 0 <= metrics["classifier_top1"] <= metrics["classifier_top5"] <= 100
  assert f"classifier top-1 {metrics['classifier_top1']:.2f} %" in evaluate.stdout
  assert (metrics["selected_epoch"], metrics["heldout_top1"]) == (best, max(values))
  assert f"classifier of epoch {best}, selected by its held-out top-1 {max(values):.2f} %" in evaluate.stdout


def test_reference_name_lists_need_labeled_per_class_zero(imagenet_like, tmp_path):
  """With a per-class count set, an unbalanced name list is refused before anything is written."""
  root, split_file, _ = imagenet_like
  flags = [*SHRINK, "--config.data.labeled_per_class=2", f"--data_dir={root}", f"--workdir={tmp_path / 'w'}"]
  result = scriptrun.run("paws_train.py", *flags, f"--split_file={split_file}")
  assert result.returncode == 2
  assert "10 names but 12 are expected" in scriptrun.error_line(result)
  assert not os.path.exists(tmp_path / "w" / "config.json")
  result = scriptrun.run("paws_train.py", *SHRINK, f"--data_dir={root}", f"--workdir={tmp_path / 'x'}")
  assert "labeled subset comes from --split_file" in scriptrun.error_line(result)
