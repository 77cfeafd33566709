"""Presets are locked; bad values, unknown fields, wrong types and unknown presets are one-line errors."""

import os

from absl import flags
import pytest

import config
from tests import scriptrun
from utils.errors import UserError

DIGITS = "--config=config.py:digits"


def test_presets_are_locked_and_hold_the_paper_values():
  c = config.get_config("cifar10")
  with pytest.raises(AttributeError):
    c.pretrain.bogus = 1
  assert (c.pretrain.batch_size, c.pretrain.images_per_class, c.pretrain.epochs) == (256, 64, 600)
  assert (c.pretrain.start_lr, c.pretrain.lr, c.pretrain.final_lr) == (0.8, 3.2, 0.032)
  assert c.data.labeled_per_class * 10 == 4000
  assert config.get_config("digits").data.dataset == "digits"
  with pytest.raises(ValueError, match="unknown preset"):
    config.get_config("nosuch")


@pytest.fixture
def workdir(tmp_path):
  """A workdir that already holds a file a refused run must leave alone."""
  path = tmp_path / "work"
  path.mkdir()
  (path / "notes.txt").write_text("earlier results")
  return str(path)


# What users ran into: a ZeroDivisionError, a run that trained nothing and saved an untrained encoder, a
# non-finite loss after start-up, flag-parser tracebacks. Each script is covered by at least one case.
@pytest.mark.parametrize(
  "script,args,error,fragments",
  [
    (
      "paws_train.py",
      [DIGITS, "--config.pretrain.batch_size=0", "--config.pretrain.tau=0", "--config.pretrain.epochs=-1"],
      "out_of_range",
      [
        "pretrain.batch_size=0 is out of range: must be an integer >= 1",
        "pretrain.tau=0.0 is out of range: must be > 0",
        "pretrain.epochs=-1 is out of range: must be an integer >= 1",
      ],
    ),
    (
      "paws_train.py",
      [DIGITS, "--config.pretrain.epochs=0"],
      "out_of_range",
      ["pretrain.epochs=0 is out of range: must be an integer >= 1"],
    ),
    (
      "paws_train.py",
      [DIGITS, "--config.pretrain.epochs=ten"],
      "bad_flag_value",
      ["--config.pretrain.epochs=ten", "expected an int"],
    ),
    (
      "fine_tune.py",
      [DIGITS, "--config.run.bogus=2"],
      "unknown_field",
      ["--config.run.bogus=2: config.run has no field 'bogus'; its fields are checkpoint_every"],
    ),
    (
      "nn_eval.py",
      ["--config=config.py:nosuch"],
      "unknown_preset",
      ["--config=config.py:nosuch: unknown preset 'nosuch'"],
    ),
  ],
  ids=["zero_and_negative", "zero_epochs", "wrong_type", "unknown_field", "unknown_preset"],
)
def test_bad_command_lines_are_one_line_errors_before_anything_runs(script, args, error, fragments, workdir):
  line = scriptrun.fails_cleanly(script, *args, error=error, workdir=workdir)
  for fragment in fragments:
    assert fragment in line


def test_define_config_flag_leaves_parsing_to_the_flag_parser():
  """Without --config on the command line, ml_collections would parse the default preset and its overrides on
  import, where a bad override is an uncatchable traceback: define_config_flag names the default instead."""
  from utils import cli  # imports TensorFlow: only this test needs it in-process

  preset = os.path.join(scriptrun.ROOT, "config.py") + ":digits"
  argv = ["script.py", "--config.run.bogus=2"]
  registry = flags.FlagValues()
  cli.define_config_flag(preset, flag_values=registry, argv=argv)  # no error on definition
  assert argv == ["script.py", f"--config={preset}", "--config.run.bogus=2"]
  with pytest.raises(UserError, match="config.run has no field 'bogus'"):
    cli.parse_flags(argv, flag_values=registry)
  argv = ["script.py", "--config=config.py:cifar10", "--config.pretrain.tau=0.2"]
  cli.define_config_flag(preset, flag_values=flags.FlagValues(), argv=argv)
  assert argv == ["script.py", "--config=config.py:cifar10", "--config.pretrain.tau=0.2"]  # left alone


def test_validation_choices_are_the_ones_the_code_takes():
  from utils import config_rules, devices
  from utils.data import datasets  # imports TensorFlow

  assert config_rules.DATASETS == datasets.DATASET_NAMES
  assert config_rules.PRECISIONS == config_rules.PRECISIONS
  for setting in config_rules.JIT_COMPILE_SETTINGS:
    assert devices.use_xla(setting) in (True, False)
  with pytest.raises(UserError) as error:
    devices.make_strategy("bogus")
  assert all(name in str(error.value) for name in config_rules.DISTRIBUTIONS)


@pytest.mark.parametrize(
  "override,message",
  [
    ("--config.pretrain.images_per_class=11", "images_per_class=11"),  # the preset labels 10 per class
    ("--config.pretrain.classes_per_batch=11", "classes_per_batch=11"),
    ("--config.pretrain.batch_size=5000", "batch_size=5000"),
  ],
)
def test_impossible_combinations_are_one_line_errors(override, message, tmp_path):
  result = scriptrun.run("paws_train.py", "--config=config.py:digits", override, f"--workdir={tmp_path}/w")
  assert result.returncode == 2
  assert message in scriptrun.error_line(result)
  assert not (tmp_path / "w" / "config.json").exists()


def test_unwritable_workdir_is_a_one_line_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  result = scriptrun.run("paws_train.py", "--config=config.py:digits", f"--workdir={blocker}/w")
  assert result.returncode == 2
  assert "not writable" in scriptrun.error_line(result)


def test_digits_preset_is_what_the_readme_states():
  """The README's description of the digits demo (and the spread it reports) follows the preset."""
  c = config.get_config("digits")
  with open(os.path.join(scriptrun.ROOT, "README.md")) as f:
    readme = f.read()
  section = readme[readme.index("## The digits demo") : readme.index("## Parameter counts")]
  stated = [
    f"{c.data.labeled_per_class} labeled images per class (label seed {c.data.label_seed})",
    f"a WRN-{c.model.depth}-{c.model.width}",
    f"2 large {c.data.large_crop_size} px views and {c.pretrain.multicrop} small {c.data.small_crop_size} px views",
    f"{c.pretrain.batch_size} unlabeled images per step, {c.pretrain.epochs} epochs",
    f"with {c.pretrain.images_per_class} support images per class in each step",
    f"{c.finetune.images_per_class} images per class per step",
    f"fine-tuning for {c.finetune.epochs} epochs with {c.finetune.views} view",
    f"learning rate {c.finetune.lr} → {c.finetune.final_lr}",
  ]
  for phrase in stated:
    assert phrase in section, phrase
