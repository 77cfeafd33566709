"""The floor plan of utils/ (README, Layout): which part may import which, read from every module's imports.

Parts, from the ground up:
  ground      utils.errors, utils.fileio, utils.config_rules, utils.native_logs: nothing of utils but each other
  devices     utils.devices: the ground floor
  workdir     utils.workdir: ground, devices
  losses      utils.losses, utils.plots: the ground floor
  data        utils.data.*: ground, data (never model or train: the input pipeline knows no network)
  model       utils.model.*: ground, model (never data, train, evaluation or export)
  train       utils.train.*: everything above but cli, evaluation and export
  evaluation  utils.evaluation, utils.export: ground, devices, workdir (artefact names), losses, data, model
  cli         utils.cli: ground, devices, workdir
Only utils.cli and the entry scripts import absl.app, absl.flags or ml_collections.config_flags.
"""

import ast
import os
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

PARTS = {
  "ground": ("utils.errors", "utils.fileio", "utils.config_rules", "utils.native_logs"),
  "devices": ("utils.devices",),
  "workdir": ("utils.workdir",),
  "losses": ("utils.losses", "utils.plots"),
  "data": ("utils.data",),
  "model": ("utils.model",),
  "train": ("utils.train",),
  "evaluation": ("utils.evaluation", "utils.export"),
  "cli": ("utils.cli",),
}
ALLOWED = {
  "ground": {"ground"},
  "devices": {"ground", "devices"},
  "workdir": {"ground", "devices", "workdir"},
  "losses": {"ground", "losses"},
  "data": {"ground", "data"},
  "model": {"ground", "model"},
  "train": {"ground", "devices", "workdir", "losses", "data", "model", "train"},
  "evaluation": {"ground", "devices", "workdir", "losses", "data", "model", "evaluation"},
  "cli": {"ground", "devices", "workdir", "cli"},
}
COMMAND_LINE_MODULES = ("absl.app", "absl.flags", "ml_collections.config_flags")


def part_of(module):
  for part, prefixes in PARTS.items():
    if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
      return part
  raise AssertionError(f"{module} belongs to no part of the floor plan; add it to PARTS in {__file__}")


def module_name(path):
  return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def imported_modules(path):
  """Every module a file imports ('from utils.data import sampling' gives utils.data.sampling), at any depth."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      found.add(node.module)
      found.update(f"{node.module}.{alias.name}" for alias in node.names)
  return found


def utils_modules():
  return sorted(p for p in (ROOT / "utils").rglob("*.py") if p.name != "__init__.py")


def project_modules(imports):
  """The utils modules among `imports` (a package like utils.data alone is not a module)."""
  known = {module_name(p) for p in utils_modules()}
  return {name for name in imports if name in known}


def broken_rules(path):
  """(importer, imported) pairs of one file that the floor plan forbids."""
  importer = module_name(path)
  allowed = ALLOWED[part_of(importer)]
  return [(importer, name) for name in sorted(project_modules(imported_modules(path))) if part_of(name) not in allowed]


@pytest.mark.parametrize("path", utils_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_imports_only_what_its_part_may(path):
  assert broken_rules(path) == []


def test_only_the_command_line_layer_uses_absl_flags_and_app():
  offenders = []
  for path in utils_modules():
    if module_name(path) == "utils.cli":
      continue
    imports = imported_modules(path)
    offenders += [(module_name(path), name) for name in COMMAND_LINE_MODULES if name in imports]
  assert offenders == []


def test_the_rules_catch_a_forbidden_import(tmp_path, monkeypatch):
  """The check itself: a data module importing the model layer, or the ground floor importing devices, is reported."""
  fake_root = tmp_path
  (fake_root / "utils" / "data").mkdir(parents=True)
  (fake_root / "utils" / "model").mkdir()
  (fake_root / "utils" / "devices.py").write_text("")
  (fake_root / "utils" / "fileio.py").write_text("from utils import devices\n")
  (fake_root / "utils" / "model" / "encoder.py").write_text("")
  bad = fake_root / "utils" / "data" / "sampling.py"
  bad.write_text("import numpy\n\ndef f():\n  from utils.model import encoder\n")
  monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
  assert broken_rules(bad) == [("utils.data.sampling", "utils.model.encoder")]
  assert broken_rules(fake_root / "utils" / "fileio.py") == [("utils.fileio", "utils.devices")]


def test_no_file_edits_sys_path():
  pattern = re.compile(r"sys\.path\.(insert|append)|sys\.path\s*=|sys\.path\s*\+=")
  files = [p for p in ROOT.rglob("*") if p.suffix in (".py", ".ipynb") and ".venv" not in p.parts]
  offenders = [
    str(p.relative_to(ROOT)) for p in files if p.name != os.path.basename(__file__) and pattern.search(p.read_text())
  ]
  assert offenders == []
