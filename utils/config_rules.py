"""What every config field may hold, and one-line messages for bad command lines (docs/troubleshooting.md).

RULES maps each dotted field of config.py's presets to its allowed values; `validate_config` checks them
all before a script does any work, so a bad value ends in one `error:` line instead of a traceback, a
division by zero or a run that silently trains nothing. A new config field needs a rule here
(tests/test_validation.py fails for a preset field without one). utils/cli.py turns absl and ml_collections
flag-parsing failures into one UserError line, and runs validate_config before each script's main.
"""

import math
import re

import ml_collections

from utils.errors import UserError

# The allowed values of every field that names a choice: the only lists of them in the project.
IN_MEMORY_DATASETS = ("cifar10", "digits")  # loaded whole (utils/data/datasets.py)
STREAMED_DATASETS = ("folder", "tfrecord", "tfds")  # streamed from files (utils/data/sources.py)
DATASETS = IN_MEMORY_DATASETS + STREAMED_DATASETS
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
JIT_COMPILE_SETTINGS = ("auto", "true", "false")
DISTRIBUTIONS = ("auto", "one_device", "mirrored", "multi_worker")
MODELS = ("wrn", "resnet50")  # the trunk (utils/model/encoder.py build_trunk)
FINETUNE_MODES = ("suncet", "classifier")  # SuNCEt, or the linear classifier of utils/model/classifier.py


class Rule:
  """The allowed values of one field.

  Args:
    requirement: what the value must be, as the message says it after "must be"; a function of the
      config when it depends on another field.
    has_type: value -> bool, the test of type, shape or membership; failing it means "is not allowed".
    in_range: (value, config) -> bool, run only on a value of the right type; failing it means
      "is out of range".
    depends_on: fields the range reads; the rule is skipped while one of them is itself invalid.
  """

  def __init__(self, requirement, has_type, in_range=lambda value, config: True, depends_on=()):
    self.requirement = requirement
    self.has_type = has_type
    self.in_range = in_range
    self.depends_on = depends_on

  def problem(self, field, value, config):
    """None if `value` is allowed, else the message naming the field, the value and the allowed range."""
    requirement = self.requirement(config) if callable(self.requirement) else self.requirement
    if not self.has_type(value):
      return f"{field}={value!r} is not allowed: must be {requirement}"
    if not self.in_range(value, config):
      return f"{field}={value!r} is out of range: must be {requirement}"
    return None


def _is_integer(value):
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
  """A finite int or float (NaN and infinities are never a sensible setting here)."""
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _bounds_text(above, at_least, below, at_most):
  """'> 0', '>= 0', 'in [0, 1)' ...: the bounds as the messages print them."""
  low = f"({above}" if above is not None else f"[{at_least}" if at_least is not None else None
  high = f"{below})" if below is not None else f"{at_most}]" if at_most is not None else None
  if low and high:
    return f"in {low}, {high}"
  if low:
    return f"> {above}" if above is not None else f">= {at_least}"
  return f"< {below}" if below is not None else f"<= {at_most}"


def _within(value, above, at_least, below, at_most):
  return (
    (above is None or value > above)
    and (at_least is None or value >= at_least)
    and (below is None or value < below)
    and (at_most is None or value <= at_most)
  )


def integer(minimum, maximum=None, at_most_field=None):
  """An int >= minimum (and <= maximum, and <= the value of `at_most_field`)."""

  def requirement(config):
    text = f"an integer >= {minimum}"
    if maximum is not None:
      text += f" and <= {maximum}"
    if at_most_field:
      text += f" and <= {at_most_field}={_get(config, at_most_field)}"
    return text

  def in_range(value, config):
    return (
      value >= minimum
      and (maximum is None or value <= maximum)
      and (at_most_field is None or value <= _get(config, at_most_field))
    )

  return Rule(requirement, _is_integer, in_range, depends_on=(at_most_field,) if at_most_field else ())


def number(above=None, at_least=None, below=None, at_most=None):
  """A finite number within the given bounds (ints allowed: `--config.pretrain.lr=1` means 1.0)."""
  return Rule(
    _bounds_text(above, at_least, below, at_most),
    _is_number,
    lambda value, config: _within(value, above, at_least, below, at_most),
  )


def probability():
  return number(at_least=0, at_most=1)


def per_channel(above=None, at_least=None, at_most=None):
  """Three numbers, one per RGB channel, each within the bounds."""
  return Rule(
    f"3 numbers (R, G, B), each {_bounds_text(above, at_least, None, at_most)}",
    lambda value: isinstance(value, (tuple, list)) and len(value) == 3 and all(map(_is_number, value)),
    lambda value, config: all(_within(v, above, at_least, None, at_most) for v in value),
  )


def crop_scale():
  """(low, high): the range of crop area fractions a random-resized crop draws from."""
  return Rule(
    "(low, high) with 0 < low <= high <= 1",
    lambda value: isinstance(value, (tuple, list)) and len(value) == 2 and all(map(_is_number, value)),
    lambda value, config: 0 < value[0] <= value[1] <= 1,
  )


def one_of(choices):
  return Rule("one of " + ", ".join(choices), lambda value: isinstance(value, str) and value in choices)


def boolean():
  return Rule("true or false", lambda value: isinstance(value, bool))


def text():
  return Rule("a non-empty string", lambda value: isinstance(value, str) and bool(value.strip()))


def wide_resnet_depth():
  """A WRN has 3 stages of n blocks of 2 convolutions, plus the stem, the last BN and the head: 6n + 4."""
  return Rule(
    "6n+4 for an integer n >= 1 (10, 16, 22, 28, ...)",
    lambda value: _is_integer(value) and value >= 10 and (value - 4) % 6 == 0,
  )


# Every field of config.py's presets. Counts and sizes are positive; probabilities and fractions lie
# in [0, 1]; temperatures are strictly positive (they divide); momenta stay below 1 (at 1 nothing decays).
RULES = {
  "name": text(),
  "seed": integer(0, 2**32 - 1),  # NumPy's global seed takes 32 bits
  "data.dataset": one_of(DATASETS),
  "data.train_files": text(),  # tfrecord: glob of the training files, relative to --data_dir
  "data.val_files": text(),
  "data.tfds_name": text(),  # tfds: NAME[/CONFIG][:VERSION] of a dataset prepared in --data_dir
  "data.image_size": integer(1),
  "data.labeled_per_class": integer(0),  # 0: as many as --split_file lists (paws_train.py)
  "data.label_seed": integer(0),
  "data.mean": per_channel(at_least=0, at_most=1),  # of pixel values scaled to [0, 1]
  "data.std": per_channel(above=0),  # divides
  "data.large_crop_size": integer(1),
  "data.small_crop_size": integer(1),
  "data.large_crop_scale": crop_scale(),
  "data.small_crop_scale": crop_scale(),
  "data.flip": boolean(),
  "data.color_jitter_prob": probability(),
  # Hue jitter is 0.2 x strength of a full turn, and a hue shift beyond half a turn wraps around.
  "data.color_jitter_strength": number(at_least=0, at_most=2.5),
  "data.solarize_prob": probability(),
  "data.equalize_prob": probability(),
  "data.grayscale_prob": probability(),
  "data.blur_prob": probability(),
  # (low, high) of the Gaussian's standard deviation in pixels; the box filters grow with it.
  "data.blur_radius": Rule(
    "(low, high) with 0 < low <= high <= 10",
    lambda value: isinstance(value, (tuple, list)) and len(value) == 2 and all(map(_is_number, value)),
    lambda value, config: 0 < value[0] <= value[1] <= 10,
  ),
  "model.name": one_of(MODELS),
  "model.depth": wide_resnet_depth(),
  "model.width": integer(1),
  "model.hidden_dim": integer(1),
  "model.projection_dim": integer(1),
  "model.prediction_head": boolean(),
  "model.prediction_hidden_dim": integer(1),
  "pretrain.epochs": integer(1),
  # A warm-up as long as the run is allowed (a short smoke run keeps the preset's warm-up in bounds).
  "pretrain.warmup_epochs": integer(0, at_most_field="pretrain.epochs"),
  "pretrain.batch_size": integer(1),
  "pretrain.multicrop": integer(0),  # 0 = no small crops (METHOD.md section 4)
  "pretrain.classes_per_batch": integer(1),
  "pretrain.images_per_class": integer(1),
  "pretrain.support_views": integer(1),
  "pretrain.unique_classes_per_replica": boolean(),
  "pretrain.label_smoothing": number(at_least=0, below=1),  # 1 would make every label uniform
  "pretrain.tau": number(above=0),
  "pretrain.sharpen_T": number(above=0),
  "pretrain.me_max": boolean(),
  "pretrain.start_lr": number(at_least=0),
  "pretrain.lr": number(at_least=0),
  "pretrain.final_lr": number(at_least=0),
  "pretrain.momentum": number(at_least=0, below=1),
  "pretrain.weight_decay": number(at_least=0),
  "pretrain.lars_eta": number(above=0),  # scales the trust ratio: 0 would freeze every LARS-adapted weight
  "finetune.epochs": integer(1),
  "finetune.classes_per_batch": integer(1),
  "finetune.images_per_class": integer(1),
  "finetune.views": integer(1),
  "finetune.tau": number(above=0),
  "finetune.lr": number(at_least=0),
  "finetune.final_lr": number(at_least=0),
  "finetune.momentum": number(at_least=0, below=1),
  "finetune.weight_decay": number(at_least=0),
  "finetune.lars_eta": number(above=0),
  # suncet: SuNCEt on class-stratified batches (CIFAR-10); classifier: trunk + first projection block + a
  # linear classifier trained with cross-entropy (ImageNet; utils/model/classifier.py).
  "finetune.mode": one_of(FINETUNE_MODES),
  "finetune.batch_size": integer(1),  # classifier mode: labeled images per step, all replicas
  "eval.tau": number(above=0),
  "eval.batch_size": integer(1),
  "eval.knn_k": integer(0),  # 0 = no k-NN; more than the supports uses them all
  "eval.knn_temperature": number(above=0),
  "eval.linear_probe": boolean(),
  "run.precision": one_of(PRECISIONS),
  "run.jit_compile": one_of(JIT_COMPILE_SETTINGS),
  "run.distribution": one_of(DISTRIBUTIONS),
  # 0 = off; N >= 2 logical CPU devices to rehearse a multi-replica run (1 would split nothing).
  "run.cpu_replicas": Rule("0 (off) or an integer >= 2", _is_integer, lambda value, config: value == 0 or value >= 2),
  "run.steps_per_loop": integer(1),
  "run.log_every": integer(1),
  "run.checkpoint_every": integer(1),
  "run.keep_checkpoints": integer(1),
  "run.collective_timeout": number(at_least=1),  # seconds (utils/devices.py watch_peers)
  # "" = off; else the dispatcher's address (utils/data/service.py).
  "run.data_service": Rule(
    "'' (off) or grpc://HOST:PORT of a tf.data service dispatcher",
    lambda value: isinstance(value, str),
    lambda value, config: value == "" or re.fullmatch(r"grpc://[^\s:/]+:\d+", value) is not None,
  ),
}


_MISSING = object()


def _get(config, field):
  """The value of a dotted field, or _MISSING."""
  value = config
  for part in field.split("."):
    if not isinstance(value, ml_collections.ConfigDict) or part not in value:
      return _MISSING
    value = value[part]
  return value


def leaves(config, prefix=""):
  """{dotted field name: value} of every non-section field of a ConfigDict."""
  fields = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      fields.update(leaves(value, f"{prefix}{key}."))
    else:
      fields[f"{prefix}{key}"] = value
  return fields


def config_problems(config):
  """Messages for every field of `config` that breaks its rule, in RULES order (fields it lacks are skipped)."""
  problems, invalid = [], set()
  for field, rule in RULES.items():
    value = _get(config, field)
    if value is _MISSING or any(other in invalid or _get(config, other) is _MISSING for other in rule.depends_on):
      continue
    problem = rule.problem(field, value, config)
    if problem:
      problems.append(problem)
      invalid.add(field)
  return problems


def check_choice(field: str, value) -> None:
  """Raises, for one field that names a choice, the UserError validate_config gives (one wording everywhere)."""
  problem = RULES[field].problem(field, value, None)
  if problem:
    raise UserError(problem)


def validate_config(config):
  """Raises UserError naming every invalid field, its value and the allowed range, all on one line."""
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f"the config is not a ConfigDict but {type(config).__name__}; pass --config=config.py:PRESET")
  problems = config_problems(config)
  if problems:
    raise UserError("; ".join(problems) + "; set valid values with --config.FIELD=VALUE")
