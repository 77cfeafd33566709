"""Every command the documentation gives runs as written: its flags are checked against the scripts' flags and
config.py, without running anything.

The commands are every `python paws_train.py|fine_tune.py|nn_eval.py ...` and `python -m benchmarks.NAME ...`
in README.md, docs/*.md, METHOD.md (code blocks, with `\\` continuations and the block's `F="..."` variables
expanded, and inline code) and config.py's docstrings. For each:
  - the script's flags are read from its flags.DEFINE_* / cli.define_config_flag calls (no import, so no
    TensorFlow) and the command line is parsed by absl and ml_collections as the script parses it: an unknown
    flag, a bad value, an unknown preset or config field, or a value of the wrong type fails;
  - the config it builds passes utils/config_rules.validate_config;
  - what the scripts require beyond single flags: --workdir (unless paws_train.py --benchmark), --data_dir
    for a streamed dataset (folder, tfrecord, tfds), and for an ImageNet command with --split_file,
    data.labeled_per_class=0 and one of the reference's file names (tfds: TFDS's copies of them,
    tfds:imagenet2012_subset/10pct or /1pct): its lists are not balanced per class,
    so any other labeled_per_class is refused (paws_train.py checks the balance only once it reads the
    images, which this test cannot);
  - benchmarks run as `python -m benchmarks.NAME` (a path `python benchmarks/NAME.py` cannot import utils/).
`--config=config.py:PRESET` (a placeholder) is checked with every preset.
"""

import ast
import os
import pathlib
import re
import shlex

from absl import flags
from ml_collections import config_flags
import pytest

import config as presets
from utils import config_rules
from utils.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENTRY_SCRIPTS = ("paws_train.py", "fine_tune.py", "nn_eval.py")
# The reference's ImageNet label lists (imagenet_subsets/), named by the fraction left unlabeled.
REFERENCE_IMAGENET_SPLITS = ("90percent.txt", "99percent.txt")
# TFDS's copies of the same lists, for data.dataset=tfds (utils/data/tfds_data.py).
TFDS_IMAGENET_SUBSETS = ("tfds:imagenet2012_subset/10pct", "tfds:imagenet2012_subset/1pct")
COMMAND = re.compile(r"\bpython3?\s+(?:-m\s+benchmarks\.\w+|benchmarks/\w+\.py|(?:paws_train|fine_tune|nn_eval)\.py)")
FENCE = re.compile(r"^\s*(```|~~~)")
ASSIGNMENT = re.compile(r"""^\s*(?:export\s+)?([A-Za-z_]\w*)=(?:"([^"]*)"|'([^']*)')\s*$""")
INLINE_CODE = re.compile(r"`([^`]+)`")


# --- Finding the commands --------------------------------------------------------------------------------


def split_commands(text):
  """The `python ...` commands of one shell line: token lists, split at &&, ||, ; and |, comments dropped."""
  lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
  lexer.whitespace_split = True
  lexer.commenters = "#"
  commands, current = [], []
  for token in lexer:
    if token and set(token) <= set(";&|"):
      commands.append(current)
      current = []
    else:
      current.append(token)
  commands.append(current)
  return [tokens for tokens in commands if tokens[:1] in (["python"], ["python3"])]


def expand(line, variables):
  return re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda m: variables.get(m.group(1), m.group(0)), line)


def markdown_commands(path):
  """(where, tokens) of every command in a markdown file: code blocks line by line, then inline code."""
  text = path.read_text(encoding="utf-8")
  found, prose, block, variables, start = [], [], None, {}, 0
  lines = text.splitlines()
  for number, line in enumerate(lines, 1):
    if FENCE.match(line):
      if block is None:
        block, variables = [], {}
      else:
        block = None
      prose.append("")
      continue
    if block is None:
      prose.append(line)
      continue
    prose.append("")
    if block and block[-1][1].endswith("\\"):  # a continued line
      start, previous = block.pop()
      line = previous[:-1] + " " + line.strip()
    else:
      start = number
    block.append((start, line))
    if line.endswith("\\"):
      continue
    assignment = ASSIGNMENT.match(line)
    if assignment:
      variables[assignment.group(1)] = assignment.group(2) if assignment.group(2) is not None else assignment.group(3)
      continue
    if COMMAND.search(line):
      for tokens in split_commands(expand(line, variables)):
        found.append((f"{path.relative_to(ROOT)}:{start}", tokens))
  prose_text = "\n".join(prose)
  for match in INLINE_CODE.finditer(prose_text):
    code = match.group(1).replace("\n", " ")
    if COMMAND.search(code):
      number = prose_text.count("\n", 0, match.start()) + 1
      for tokens in split_commands(code):
        found.append((f"{path.relative_to(ROOT)}:{number}", tokens))
  return found


def docstring_commands(path):
  """(where, tokens) of every command in a Python file's docstrings (module, classes, functions)."""
  tree = ast.parse(path.read_text(encoding="utf-8"))
  found = []
  for node in ast.walk(tree):
    if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    docstring = ast.get_docstring(node, clean=False)
    if not docstring:
      continue
    first_line = node.body[0].lineno if node.body else 1
    joined = re.sub(r"\\\n\s*", " ", docstring)
    for line in joined.splitlines():
      match = COMMAND.search(line)
      if match:
        for tokens in split_commands(line[match.start() :]):
          found.append((f"{path.relative_to(ROOT)} (docstring at line {first_line})", tokens))
  return found


def documented_commands():
  found = []
  for path in [ROOT / "README.md", ROOT / "METHOD.md", *sorted((ROOT / "docs").glob("*.md"))]:
    found += markdown_commands(path)
  found += docstring_commands(ROOT / "config.py")
  return found


# --- The scripts' flags ----------------------------------------------------------------------------------


def module_constant(tree, alias, name):
  """The literal value of `alias.name` in a script: alias is a module the script imports (from utils import
  evaluation; import utils.evaluation as evaluation), name a constant assigned at its top level."""
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      modules = {a.asname or a.name: f"{node.module}.{a.name}" for a in node.names}
    elif isinstance(node, ast.Import):
      modules = {a.asname or a.name: a.name for a in node.names}
    else:
      continue
    if alias in modules:
      source = ROOT / (modules[alias].replace(".", "/") + ".py")
      for statement in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(statement, ast.Assign) and any(getattr(t, "id", None) == name for t in statement.targets):
          return ast.literal_eval(statement.value)
  return None


def literal(node, tree=None):
  """A literal's value; also list(...) / tuple(...) of one, and a module's constant (module_constant)."""
  try:
    return ast.literal_eval(node)
  except ValueError:
    pass
  if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("list", "tuple") and len(node.args) == 1:
    return literal(node.args[0], tree)
  if tree is not None and isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
    return module_constant(tree, node.value.id, node.attr)
  return None


def script_flags(path):
  """[(flag name, kind, keyword arguments)] of the flags a script defines, read from its source: every
  flags.DEFINE_KIND("name", ...) call (module level or in a function) and cli.define_config_flag (--config,
  with the preset it puts on a command line that names none)."""
  tree = ast.parse(path.read_text(encoding="utf-8"))
  definitions = []
  for node in ast.walk(tree):
    if not isinstance(node, ast.Call):
      continue
    function = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
    if function == "define_config_flag":
      definitions.append(("config", "config", {"default": literal(node.args[0]) if node.args else "config.py:digits"}))
    elif function.startswith("DEFINE_"):
      name = literal(node.args[0])
      keywords = {k.arg: literal(k.value) for k in node.keywords if k.arg in ("lower_bound", "upper_bound")}
      if function == "DEFINE_enum":
        keywords["enum_values"] = literal(node.args[2], tree) if len(node.args) > 2 else None
      definitions.append((name, function[len("DEFINE_") :], keywords))
  return definitions


def flag_registry(definitions, argv):
  """A fresh absl registry with the script's flags (defaults left out: only names, types and bounds matter)."""
  registry = flags.FlagValues()
  for name, kind, keywords in definitions:
    if kind == "config":
      config_flags.DEFINE_config_file(name, None, "", flag_values=registry, lock_config=True, sys_argv=argv)
    elif kind in ("bool", "boolean"):
      flags.DEFINE_bool(name, False, "", flag_values=registry)
    elif kind in ("integer", "float"):
      bounds = {k: v for k, v in keywords.items() if v is not None}
      getattr(flags, f"DEFINE_{kind}")(name, None, "", flag_values=registry, **bounds)
    elif kind == "enum" and keywords.get("enum_values"):
      flags.DEFINE_enum(name, None, keywords["enum_values"], "", flag_values=registry)
    elif kind in ("string", "enum"):  # an enum whose choices are not a literal: any string
      flags.DEFINE_string(name, None, "", flag_values=registry)
    elif kind in ("list", "multi_string"):
      getattr(flags, f"DEFINE_{kind}")(name, None, "", flag_values=registry)
    else:
      raise AssertionError(f"flags.DEFINE_{kind} ({name}): teach tests/test_doc_commands.py this kind")
  return registry


# --- The check --------------------------------------------------------------------------------------------


def command_problems(tokens):
  """Why the command would not run as written (empty: it would), checked with every preset for PRESET."""
  arguments = tokens[1:]
  if arguments[0] == "-m":
    module, arguments = arguments[1], arguments[2:]
    script = ROOT / (module.replace(".", "/") + ".py")
    if not module.startswith("benchmarks.") or not script.is_file():
      return [f"no module {module}"]
  elif arguments[0].startswith("benchmarks/"):
    name = arguments[0][len("benchmarks/") :].removesuffix(".py")
    return [f"{arguments[0]} cannot import utils/ when run by path; run it as python -m benchmarks.{name}"]
  else:
    script, arguments = ROOT / arguments[0], arguments[1:]
  if "--config=config.py:PRESET" in arguments:
    problems = []
    for preset in presets.PRESETS:
      concrete = [f"--config=config.py:{preset}" if a == "--config=config.py:PRESET" else a for a in arguments]
      problems += [f"{preset}: {problem}" for problem in parsed_problems(script, concrete)]
    return problems
  return parsed_problems(script, arguments)


def parsed_problems(script, arguments):
  definitions = script_flags(script)
  argv = [script.name, *arguments]
  for _, kind, keywords in definitions:  # as utils/cli.py define_config_flag: the default preset, if none
    if kind == "config" and not any(re.match(r"^--?(config|flagfile)(=|$)", a) for a in arguments):
      argv.insert(1, f"--config={keywords['default']}")
  try:
    registry = flag_registry(definitions, argv)
    remaining = registry(argv)
    config = registry["config"].value if "config" in registry else None
  except Exception as error:  # absl's and ml_collections' parse errors, an unknown config field
    return [f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"]
  problems = [f"positional arguments {remaining[1:]}"] if remaining[1:] else []
  values = {name: registry[name].value for name in registry}
  if config is not None:
    try:
      config_rules.validate_config(config)
    except UserError as error:
      problems.append(str(error))
  if script.name in ENTRY_SCRIPTS:
    benchmark = values.get("benchmark") or 0
    if not values.get("workdir") and not benchmark:
      problems.append("no --workdir")
    if config.data.dataset in config_rules.STREAMED_DATASETS and not values.get("data_dir") and not benchmark:
      problems.append(f"data.dataset={config.data.dataset} reads --data_dir, which is missing")
    split_file = values.get("split_file")
    if split_file and config.name == "imagenet":
      if config.data.labeled_per_class != 0:
        problems.append(
          "an ImageNet --split_file (the reference's unbalanced name lists) needs --config.data.labeled_per_class=0"
        )
      if config.data.dataset == "tfds":
        if split_file not in TFDS_IMAGENET_SUBSETS:
          problems.append(f"--split_file={split_file}: TFDS's ImageNet subsets are {', '.join(TFDS_IMAGENET_SUBSETS)}")
      elif os.path.basename(split_file) not in REFERENCE_IMAGENET_SPLITS:
        problems.append(f"--split_file={split_file}: the reference's lists are {', '.join(REFERENCE_IMAGENET_SPLITS)}")
  return problems


COMMANDS = documented_commands()
# ml_collections loads config.py with the import system's deprecated load_module.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")


@pytest.fixture(autouse=True)
def in_repository_root(monkeypatch):
  monkeypatch.chdir(ROOT)  # --config=config.py:... is read relative to the working directory, as in the docs


@pytest.mark.parametrize("where,tokens", COMMANDS, ids=[f"{where} {' '.join(t[1:3])}" for where, t in COMMANDS])
def test_documented_command_runs_as_written(where, tokens):
  assert command_problems(tokens) == [], f"{where}: {shlex.join(tokens)}"


def test_the_commands_are_found():
  """The extraction itself: each kind of place yields its commands (an extractor that finds nothing passes all)."""
  places = {where.split(":")[0].split(" ")[0] for where, _ in COMMANDS}
  assert {"README.md", "config.py", "docs/data.md", "docs/running.md", "docs/results.md"} <= places
  lines = [shlex.join(tokens) for _, tokens in COMMANDS]
  imagenet = [line for line in lines if "config.py:imagenet" in line and "--split_file" in line]
  assert any("--split_file=90percent.txt" in line for line in imagenet), imagenet
  assert any(line.startswith("python -m benchmarks.") for line in lines)
  # A `$F` variable of a code block is expanded, a `\` continuation joined.
  assert any("paws_train.py --config=config.py:digits --config.run.cpu_replicas=2" in line for line in lines)
  assert any("--config.pretrain.final_lr=0.008" in line and "--split_file=" in line for line in lines)
  assert len(COMMANDS) >= 30, len(COMMANDS)


@pytest.mark.parametrize(
  "command,problem",
  [
    # config.py's docstring before the fix: the reference's unbalanced list with the preset's 128 per class.
    (
      "python paws_train.py --config=config.py:imagenet --data_dir=IN --workdir=runs/in --split_file=10percent.txt",
      "needs --config.data.labeled_per_class=0",
    ),
    (
      "python paws_train.py --config=config.py:imagenet --data_dir=IN --workdir=w --split_file=10percent.txt "
      "--config.data.labeled_per_class=0",
      "the reference's lists are 90percent.txt, 99percent.txt",
    ),
    ("python benchmarks/digits_seeds.py --seeds 152 --no-baselines", "run it as python -m benchmarks.digits_seeds"),
    ("python -m benchmarks.digits_seeds --no-baselines", "Unknown command line flag 'no-baselines'"),
    ("python -m benchmarks.train_speed --steps=0", "IllegalFlagValueError"),
    ("python fine_tune.py --config=config.py:digits --workdir=w --split_file=x.txt", "Unknown command line flag"),
    ("python nn_eval.py --config=config.py:digits --workdir=w --encoder=best", "IllegalFlagValueError"),
    ("python nn_eval.py --config=config.py:digits --workdir=w extra", "positional arguments ['extra']"),
    ("python paws_train.py --config=config.py:nope --workdir=w", "IllegalFlagValueError"),
    ("python paws_train.py --config=config.py:digits --workdir=w --config.data.nope=1", "nope"),
    ("python paws_train.py --config=config.py:digits --workdir=w --config.pretrain.epochs=x", "IllegalFlagValueError"),
    ("python paws_train.py --config=config.py:digits --workdir=w --config.eval.tau=0", "eval.tau=0.0 is out of range"),
    ("python paws_train.py --config=config.py:digits", "no --workdir"),
    ("python nn_eval.py --config=config.py:imagenet --workdir=w", "reads --data_dir, which is missing"),
    ("python paws_train.py --config=config.py:PRESET", "no --workdir"),
  ],
)
def test_the_check_finds_commands_that_would_not_run(command, problem):
  problems = command_problems(shlex.split(command))
  assert any(problem in p for p in problems), problems


@pytest.mark.parametrize(
  "command",
  [
    "python paws_train.py --config=config.py:imagenet --benchmark=20",  # no workdir or data needed
    "python paws_train.py --config=config.py:PRESET --benchmark=20",
    "python -m benchmarks.digits_seeds --seeds=152,100 --config.run.precision=auto --nobaselines",
    "python paws_train.py --config=config.py:digits --workdir=w --config.data.large_crop_scale='(0.5, 1.0)'",
  ],
)
def test_the_check_passes_commands_that_run(command):
  assert command_problems(shlex.split(command)) == []
