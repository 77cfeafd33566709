"""The documentation: README size, links and anchors, figures with their commands, the CI commands, the catalogue.

No network: every check reads files of the repository.
"""

import pathlib
import re

import pytest

from tests import scriptrun

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINKED_FILES = [README, ROOT / "METHOD.md", *DOCS]
README_MAX_LINES = 200

# The README's quick start; CI (.ci/run) installs requirements-dev.txt and runs pytest on tests/, i.e. command 2.
COMMAND_1 = (
  "pip install -r requirements.txt && python paws_train.py --config=config.py:digits --workdir=runs/digits && "
  "python fine_tune.py --config=config.py:digits --workdir=runs/digits && "
  "python nn_eval.py --config=config.py:digits --workdir=runs/digits"
)
COMMAND_2 = "pip install -r requirements-dev.txt && python -m pytest -q tests"

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMAGE = re.compile(r"!\[[^\]]*\]\(")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
COMMAND_SCRIPTS = ("paws_train.py", "fine_tune.py", "nn_eval.py", "benchmarks/")


def prose_lines(text):
  """(line number, line) of the lines outside fenced code blocks."""
  inside = False
  for number, line in enumerate(text.splitlines(), 1):
    if FENCE.match(line):
      inside = not inside
      continue
    if not inside:
      yield number, line


def fenced_blocks(text):
  """The lines of each fenced code block, in order."""
  blocks, current = [], None
  for line in text.splitlines():
    if FENCE.match(line):
      if current is None:
        current = []
      else:
        blocks.append(current)
        current = None
    elif current is not None:
      current.append(line)
  return blocks


def slug(heading):
  """GitHub's anchor for a heading: rendered text, lowercase, punctuation dropped, spaces to '-'."""
  text = INLINE_CODE.sub(lambda m: m.group(2), heading)
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link in a heading anchors on its text
  text = text.strip().lower()
  text = "".join(c for c in text if c.isalnum() or c in " -_")
  return text.replace(" ", "-")


def anchors(text):
  """Every heading anchor of a markdown text; repeated headings get -1, -2, ... as on GitHub."""
  found, seen = set(), {}
  for _, line in prose_lines(text):
    match = HEADING.match(line)
    if match:
      base = slug(match.group(2))
      count = seen.get(base, 0)
      seen[base] = count + 1
      found.add(base if count == 0 else f"{base}-{count}")
  return found


def links(text):
  """(line number, target) of every markdown link and image outside code."""
  for number, line in prose_lines(text):
    for match in LINK.finditer(INLINE_CODE.sub("", line)):
      yield number, match.group(1)


def broken_links(path, root=ROOT):
  """The relative links of the markdown file `path` whose file, or whose heading anchor, does not exist."""
  problems = []
  text = path.read_text()
  for number, target in links(text):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:: not checked here (no network)
      continue
    file_part, _, anchor = target.partition("#")
    linked = (path.parent / file_part).resolve() if file_part else path
    where = f"{path.relative_to(root)}:{number}: {target}"
    if root not in linked.parents and linked != root:
      problems.append(f"{where} leaves the repository")
    elif not linked.exists():
      problems.append(f"{where}: no such file")
    elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
      problems.append(f"{where}: no heading with anchor #{anchor} in {linked.relative_to(root)}")
  return problems


def images_without_command(text):
  """Line numbers of images with no line naming a command (python + a script) within 3 lines of them."""
  lines = text.splitlines()
  prose = dict(prose_lines(text))
  missing = []
  for number, line in prose.items():
    if not IMAGE.search(line):
      continue
    nearby = lines[max(0, number - 4) : number + 3]
    if not any("python " in near and any(s in near for s in COMMAND_SCRIPTS) for near in nearby):
      missing.append(number)
  return missing


# --- The checkers themselves -----------------------------------------------------------


@pytest.mark.parametrize(
  "heading,expected",
  [
    ("11. Faithfulness to the reference", "11-faithfulness-to-the-reference"),
    ("CIFAR-10 and ImageNet: the paper's numbers", "cifar-10-and-imagenet-the-papers-numbers"),
    ("XLA under `MirroredStrategy`", "xla-under-mirroredstrategy"),
    ("The [digits](x.md) demo", "the-digits-demo"),
    ("run_loop and steps_per_epoch", "run_loop-and-steps_per_epoch"),
  ],
)
def test_slug_follows_github(heading, expected):
  assert slug(heading) == expected


def test_broken_links_and_anchors_are_found(tmp_path):
  (tmp_path / "other.md").write_text("# Title\n\n## A section\n\n## A section\n\n```\n## not a heading\n```\n")
  page = tmp_path / "page.md"
  page.write_text(
    "[ok](other.md#a-section) [second](other.md#a-section-1) [self](#local) [web](https://example.com)\n"
    "## Local\n"
    "[gone](missing.md) [bad anchor](other.md#nothing) [code heading](other.md#not-a-heading)\n"
    "`[in code](missing.md)`\n"
    "```\n[in a block](missing.md)\n```\n"
  )
  problems = broken_links(page, root=tmp_path)
  assert len(problems) == 3, problems
  assert "missing.md: no such file" in problems[0]
  assert "#nothing" in problems[1] and "#not-a-heading" in problems[2]


def test_images_without_their_command_are_found():
  text = "text\n\n![plot](a.png)\n\nmore\n\nwritten by `python benchmarks/x.py`\n\n![plot](b.png)\n"
  assert images_without_command(text) == [3]


# --- The repository's documents -------------------------------------------------------------


def test_readme_fits_a_few_screens():
  lines = README.read_text().splitlines()
  assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"


def test_docs_exist():
  assert {p.name for p in DOCS} >= {"running.md", "data.md", "results.md", "troubleshooting.md"}


@pytest.mark.parametrize("path", LINKED_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
  assert not broken_links(path)


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_figure_names_its_command(path):
  missing = images_without_command(path.read_text())
  assert not missing, f"{path.name}: images on lines {missing} have no command within 3 lines"


def test_quick_start_holds_the_commands_ci_runs():
  ci = (ROOT / ".ci" / "run").read_text()
  assert "-r requirements-dev.txt" in ci
  assert re.search(r"^python -m pytest -q .*\btests$", ci, re.MULTILINE), "CI no longer runs pytest on tests/"
  assert "-r requirements.txt" in (ROOT / "requirements-dev.txt").read_text()  # command 2 installs command 1's too
  code_lines = [line.strip() for block in fenced_blocks(README.read_text()) for line in block]
  assert COMMAND_1 in code_lines
  assert COMMAND_2 in code_lines


def test_troubleshooting_lists_every_error():
  text = (ROOT / "docs" / "troubleshooting.md").read_text()
  rows = [line.replace("`", "") for line in text.splitlines() if line.startswith("| `")]
  missing = [phrase for phrase in scriptrun.ERRORS.values() if not any(phrase in row for row in rows)]
  assert not missing, f"docs/troubleshooting.md lacks: {missing}"


def test_readme_layout_names_every_utils_module():
  layout = next(block for block in fenced_blocks(README.read_text()) if any("utils/" in line for line in block))
  listed = set(re.findall(r"\b(\w+\.py)\b", "\n".join(layout)))
  modules = {p.name for p in (ROOT / "utils").rglob("*.py") if p.name != "__init__.py"}
  assert modules <= listed, f"README layout lacks {sorted(modules - listed)}"
  scripts = {"config.py", "paws_train.py", "fine_tune.py", "nn_eval.py"}
  unknown = listed - scripts - modules
  assert not unknown, f"README layout names modules that do not exist: {sorted(unknown)}"
