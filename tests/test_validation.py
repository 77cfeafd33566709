"""utils/config_rules.py and utils/cli.py: every preset field has a rule, the presets pass it, bad values and bad
command lines are one-line errors naming the field, the value and what is allowed."""

import math
import os

from absl import flags
import ml_collections
from ml_collections import config_flags
import pytest

import config
from utils import cli, config_rules
from utils.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Fields a rule may name before config.py has them (run.cpu_replicas is being added to the presets).
NOT_YET_IN_PRESETS = {"run.cpu_replicas"}
EPOCHS = lambda c: c.pretrain.epochs  # values that depend on the preset are functions of it

# Values each rule must refuse: at least one per rule, at the edge of the allowed range where there is one.
BAD = {
  "name": ["", "  ", 3],
  "seed": [-1, 2**32, 1.5, True],
  "data.dataset": ["imagenet", "CIFAR10", ""],
  "data.train_files": ["", "  ", 3],
  "data.val_files": [""],
  "data.tfds_name": ["", 3],
  "data.image_size": [0, -32],
  "data.labeled_per_class": [-1, 2.5],
  "data.label_seed": [-1],
  "data.mean": [(0.5, 0.5), (0.5, 0.5, 1.01), (0.5, -0.01, 0.5), (0.5, math.nan, 0.5), "0.5"],
  "data.std": [(0.5, 0.5, 0.0), (0.2, 0.2, 0.2, 0.2), (-0.2, 0.2, 0.2), (0.2, math.inf, 0.2)],
  "data.large_crop_size": [0],
  "data.small_crop_size": [0, -10],
  "data.large_crop_scale": [(0.0, 1.0), (0.8, 0.5), (0.5, 1.01), (0.5,), (0.3, 0.5, 0.7)],
  "data.small_crop_scale": [(0.3, 0.2), (-0.1, 0.5)],
  "data.flip": ["yes", 1],
  "data.color_jitter_prob": [-0.01, 1.01],
  "data.color_jitter_strength": [-0.5, 2.51],
  "data.solarize_prob": [1.5],
  "data.equalize_prob": [-1.0],
  "data.grayscale_prob": [1.01, -0.1],
  "data.blur_prob": [2.0],
  "data.blur_radius": [(0.0, 2.0), (2.0, 0.1), (0.1, 10.5), (0.1,), (0.1, math.nan), 2.0],
  "model.name": ["resnet18", "WRN", "", 50],
  "model.depth": [29, 4, 9, 0, 27],
  "model.width": [0],
  "model.hidden_dim": [0],
  "model.projection_dim": [0, -128],
  "model.prediction_head": ["false", 0],
  "model.prediction_hidden_dim": [0],
  "pretrain.epochs": [0, -1],
  "pretrain.warmup_epochs": [-1, lambda c: c.pretrain.epochs + 1, lambda c: c.pretrain.epochs + 5],
  "pretrain.batch_size": [0, -256],
  "pretrain.multicrop": [-1],
  "pretrain.classes_per_batch": [0],
  "pretrain.images_per_class": [0],
  "pretrain.support_views": [0],
  "pretrain.label_smoothing": [1.0, -0.1],
  "pretrain.tau": [0.0, -0.1, math.nan, math.inf],
  "pretrain.sharpen_T": [0.0, -1.0],
  "pretrain.me_max": ["true"],
  "pretrain.unique_classes_per_replica": [1],
  "pretrain.start_lr": [-0.1],
  "pretrain.lr": [-1.0, math.inf],
  "pretrain.final_lr": [-1e-3],
  "pretrain.momentum": [1.0, -0.1],
  "pretrain.weight_decay": [-1e-6],
  "pretrain.lars_eta": [0.0, -0.001],
  "finetune.epochs": [0],
  "finetune.classes_per_batch": [0],
  "finetune.images_per_class": [0],
  "finetune.views": [0],
  "finetune.tau": [0.0],
  "finetune.lr": [-0.1],
  "finetune.final_lr": [-0.01],
  "finetune.momentum": [1.0],
  "finetune.weight_decay": [-0.1],
  "finetune.lars_eta": [0.0],
  "finetune.mode": ["linear", "Classifier", "", 1],
  "finetune.batch_size": [0, -1024, 1.5],
  "eval.tau": [0.0, -0.1],
  "eval.batch_size": [0],
  "eval.knn_k": [-1, 2.5, True],
  "eval.knn_temperature": [0.0, -0.07, math.inf],
  "eval.linear_probe": ["yes", 1],
  "run.precision": ["float64", "bfloat16", ""],
  "run.jit_compile": ["maybe", "True", True],
  "run.distribution": ["tpu", "mirror"],
  "run.cpu_replicas": [-1, 1, 2.0],
  "run.steps_per_loop": [0],
  "run.log_every": [0],
  "run.checkpoint_every": [0, -500],
  "run.keep_checkpoints": [0],
  "run.collective_timeout": [0.0, 0.5, -10.0, "10"],
  "run.data_service": ["localhost:5050", "grpc://host", "grpc://host:port", "http://host:5050", 5050],
}

# Edge values the meaning allows: they must pass.
GOOD = {
  "seed": [0, 2**32 - 1],
  "data.mean": [(0.0, 1.0, 0.5), [0.1, 0.2, 0.3]],
  "data.large_crop_scale": [(1.0, 1.0), (0.01, 1.0)],
  "data.color_jitter_strength": [0.0, 2.5],
  "data.blur_radius": [(0.1, 2.0), (1.0, 1.0), [1e-3, 10]],
  "model.depth": [10, 16, 22, 28, 40],
  "pretrain.multicrop": [0],
  "pretrain.warmup_epochs": [0, EPOCHS],
  "pretrain.label_smoothing": [0.0, 0.999],
  "pretrain.momentum": [0.0],
  "pretrain.lr": [0.0, 5],  # an int where a float is expected is the same rate
  "pretrain.tau": [1e-3, 10],
  "finetune.weight_decay": [0.0],
  "run.jit_compile": ["true", "false"],
  "run.cpu_replicas": [0, 2, 4],
  "eval.knn_k": [0, 1, 10**6],
  "run.collective_timeout": [1, 2.5, 600],
  "run.data_service": ["", "grpc://localhost:5050", "grpc://10.0.0.2:5050"],
}


def editable(preset_name):
  """A preset as a ConfigDict without type checks or lock, so any value (and new fields) can be set."""
  return ml_collections.ConfigDict(config.get_config(preset_name).to_dict(), type_safe=False)


def set_field(c, field, value):
  *sections, name = field.split(".")
  for section in sections:
    c = c[section]
  c[name] = value


def resolve(value, c):
  return value(c) if callable(value) else value


@pytest.mark.parametrize("preset", sorted(config.PRESETS))
def test_every_preset_field_has_a_rule(preset):
  fields = config_rules.leaves(config.get_config(preset))
  assert len(fields) > 50
  missing = sorted(set(fields) - set(config_rules.RULES))
  assert not missing, f"config fields without a rule in utils/config_rules.py RULES: {missing}"


def test_every_rule_names_a_preset_field():
  fields = set().union(*(config_rules.leaves(config.get_config(name)) for name in config.PRESETS))
  assert set(config_rules.RULES) - fields <= NOT_YET_IN_PRESETS


def test_this_test_has_bad_values_for_every_rule():
  assert set(BAD) == set(config_rules.RULES)
  assert set(GOOD) <= set(config_rules.RULES)


@pytest.mark.parametrize("preset", sorted(config.PRESETS))
def test_presets_pass(preset):
  assert config_rules.config_problems(config.get_config(preset)) == []
  config_rules.validate_config(config.get_config(preset))
  c = editable(preset)
  c.run.cpu_replicas = 0  # the coming field, at its default
  config_rules.validate_config(c)


@pytest.mark.parametrize("field", sorted(BAD))
def test_bad_values_are_refused_naming_field_value_and_range(field):
  for preset in sorted(config.PRESETS):
    for bad in BAD[field]:
      c = editable(preset)
      value = resolve(bad, c)
      set_field(c, field, value)
      problems = config_rules.config_problems(c)
      assert len(problems) == 1, (preset, value, problems)
      assert problems[0].startswith(f"{field}={value!r} is "), problems[0]
      assert " must be " in problems[0]
      with pytest.raises(UserError) as error:
        config_rules.validate_config(c)
      assert problems[0] in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("field", sorted(GOOD))
def test_edge_values_the_meaning_allows_pass(field):
  for preset in sorted(config.PRESETS):
    for good in GOOD[field]:
      c = editable(preset)
      set_field(c, field, resolve(good, c))
      assert config_rules.config_problems(c) == [], (preset, field, good)


def test_messages_as_printed():
  c = editable("digits")
  c.pretrain.tau = 0.0
  assert config_rules.config_problems(c) == ["pretrain.tau=0.0 is out of range: must be > 0"]
  c = editable("digits")
  c.pretrain.warmup_epochs = 31
  assert config_rules.config_problems(c) == [
    "pretrain.warmup_epochs=31 is out of range: must be an integer >= 0 and <= pretrain.epochs=30"
  ]
  c = editable("digits")
  c.run.precision = "float64"
  assert config_rules.config_problems(c) == [
    "run.precision='float64' is not allowed: must be one of auto, float32, mixed_float16, mixed_bfloat16"
  ]
  c = editable("digits")
  c.data.small_crop_scale = (0.75, 0.3)
  assert config_rules.config_problems(c) == [
    "data.small_crop_scale=(0.75, 0.3) is out of range: must be (low, high) with 0 < low <= high <= 1"
  ]
  c = editable("digits")
  c.pretrain.label_smoothing = 1.0
  assert config_rules.config_problems(c) == ["pretrain.label_smoothing=1.0 is out of range: must be in [0, 1)"]


def test_all_problems_on_one_line_and_no_follow_on_noise():
  c = editable("digits")
  c.pretrain.batch_size, c.pretrain.tau, c.pretrain.epochs = 0, 0.0, 0
  with pytest.raises(UserError) as error:
    config_rules.validate_config(c)
  message = str(error.value)
  assert "\n" not in message
  for fragment in (
    "pretrain.epochs=0 is out of range",
    "pretrain.batch_size=0 is out of range",
    "pretrain.tau=0.0 is out of range",
  ):
    assert fragment in message
  # warmup_epochs=2 is only wrong relative to the invalid epochs=0: not reported on top.
  assert "warmup_epochs" not in message


def test_missing_fields_are_skipped_and_non_configs_refused():
  c = editable("digits")
  del c.run["log_every"]
  assert config_rules.config_problems(c) == []
  with pytest.raises(UserError, match="not a ConfigDict"):
    config_rules.validate_config({"pretrain": {"tau": 0.1}})


# --- Command-line parsing (absl + ml_collections), in a registry of the test's own --------------------

CONFIG = os.path.join(ROOT, "config.py")


def parse(*args):
  """validation.parse_flags on a fresh flag registry with --config (as the scripts define it) and --workdir."""
  registry = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "Folder.", flag_values=registry)
  argv = ["script.py", *args]
  config_flags.DEFINE_config_file("config", None, "Preset.", flag_values=registry, lock_config=True, sys_argv=argv)
  remaining = cli.parse_flags(argv, flag_values=registry)
  return registry, remaining


def parse_error(*args):
  with pytest.raises(UserError) as error:
    parse(*args)
  message = str(error.value)
  assert "\n" not in message and "Traceback" not in message
  return message


def test_valid_command_line_applies_the_overrides():
  registry, remaining = parse(f"--config={CONFIG}:digits", "--config.pretrain.tau=0.2", "--workdir=w", "rest")
  assert remaining == ["script.py", "rest"]
  assert registry["config"].value.pretrain.tau == 0.2 and registry["config"].value.name == "digits"


def test_unknown_preset():
  message = parse_error(f"--config={CONFIG}:nosuch")
  assert message == (
    f"invalid value --config={CONFIG}:nosuch: unknown preset 'nosuch'; choose one of ['cifar10', 'digits', 'imagenet']"
  )


def test_unknown_field_lists_the_valid_names():
  message = parse_error(f"--config={CONFIG}:digits", "--config.run.bogus=2")
  assert message.startswith("--config.run.bogus=2: config.run has no field 'bogus'; its fields are ")
  assert "checkpoint_every" in message and "precision" in message
  message = parse_error(f"--config={CONFIG}:digits", "--config.bogus.x=1")
  assert message.startswith("--config.bogus.x=1: config has no field 'bogus'; its fields are data, eval, ")


def test_misspelt_field_gets_the_close_match():
  message = parse_error(f"--config={CONFIG}:digits", "--config.pretrain.tau=0.1", "--config.run.precison=float32")
  assert message == (
    "--config.run.precison=float32: config.run has no field 'precison'; did you mean --config.run.precision?"
  )


def test_override_below_a_value():
  message = parse_error(f"--config={CONFIG}:digits", "--config.pretrain.tau.x=1")
  assert message == "--config.pretrain.tau.x=1: config.pretrain.tau is a float, not a section with fields"


@pytest.mark.parametrize(
  "override,expected",
  [
    (
      "--config.pretrain.epochs=ten",
      "invalid value --config.pretrain.epochs=ten: invalid literal for int() with base 10: 'ten'; expected an int",
    ),
    (
      "--config.pretrain.tau=small",
      "invalid value --config.pretrain.tau=small: could not convert string to float: 'small'; expected a float",
    ),
    ("--config.pretrain.me_max=maybe", "expected true or false"),
  ],
)
def test_wrong_type(override, expected):
  assert expected in parse_error(f"--config={CONFIG}:digits", override)


def test_unknown_flag_with_and_without_suggestion():
  assert parse_error(f"--config={CONFIG}:digits", "--workdr=w") == (
    "unknown command line flag --workdr; did you mean --workdir?"
  )
  assert parse_error(f"--config={CONFIG}:digits", "--zzz=1") == (
    "unknown command line flag --zzz; --helpfull lists the flags"
  )


def test_missing_config_file(tmp_path):
  missing = str(tmp_path / "nosuch.py")
  for args in ([f"--config={missing}"], [f"--config={missing}", "--config.pretrain.tau=1"]):
    message = parse_error(*args)
    assert message.startswith(f"cannot load the config file of --config={missing} (")
    assert "No such file" in message


def test_override_before_the_config_flag():
  message = parse_error("--config.pretrain.tau=0.2", f"--config={CONFIG}:digits")
  assert "before a value for --config" in message
