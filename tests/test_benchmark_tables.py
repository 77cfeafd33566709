"""benchmarks/digits_seeds.py's results table: values, summary rows, and the supervised column only when run;
the benchmarks' command lines: `python -m benchmarks.NAME` with the entry scripts' --config flags."""

import numpy as np

from benchmarks import digits_seeds
from tests import scriptrun

ROWS = [
  (152, 97.78, 96.44, 136.4, 94.0, 91.11),
  (100, 98.0, 98.0, 231.0, 93.0, 90.0),
  (101, 98.67, 97.0, 170, 95.0, 90.5),
]


def cells(line):
  return [cell.strip() for cell in line.strip("|").split("|")]


def test_results_table_with_baselines():
  lines = digits_seeds.results_table(ROWS, baselines=True)
  assert len(cells(lines[0])) == 6 and "supervised-only top-1 (%)" in lines[0]
  assert cells(lines[2]) == ["152", "97.78", "96.44", "136", "94.00", "91.11"]
  summary = {cells(line)[0]: cells(line)[1:] for line in lines[5:]}
  values = np.array([row[1:] for row in ROWS])
  assert summary["**mean**"][0] == f"{values[:, 0].mean():.2f}"
  assert summary["**sd**"][3] == f"{values[:, 3].std(ddof=1):.2f}" == "1.00"
  assert summary["**min**"][2] == "136" and summary["**max**"][2] == "231"


def test_results_table_without_baselines_drops_the_supervised_column():
  rows = [row[:4] + (float("nan"),) + row[5:] for row in ROWS]
  lines = digits_seeds.results_table(rows, baselines=False)
  assert "supervised" not in lines[0] and "nan" not in "\n".join(lines)
  assert lines[1] == "|---|---|---|---|---|"
  assert cells(lines[3]) == ["100", "98.00", "98.00", "231", "90.00"]


def test_results_table_puts_knn_and_linear_probe_beside_soft_nn():
  # each row + (k-NN fine-tuned, linear probe fine-tuned, k-NN pre-trained, linear probe pre-trained)
  other = [(97.1, 96.9, 95.2, 96.0), (98.2, 97.5, 96.8, 97.7), (98.0, 98.4, 96.0, 97.1)]
  rows = [row + extra for row, extra in zip(ROWS, other, strict=True)]
  lines = digits_seeds.results_table(rows, baselines=False)
  assert cells(lines[0]) == [
    "label seed",
    "PAWS top-1, fine-tuned (%)",
    "PAWS top-1, pre-trained only (%)",
    "k-NN top-1, fine-tuned (%)",
    "linear-probe top-1, fine-tuned (%)",
    "k-NN top-1, pre-trained only (%)",
    "linear-probe top-1, pre-trained only (%)",
    "wall time, 3 scripts (s)",
    "raw-pixel 1-NN top-1 (%)",
  ]
  assert cells(lines[2]) == ["152", "97.78", "96.44", "97.10", "96.90", "95.20", "96.00", "136", "91.11"]
  summary = {cells(line)[0]: cells(line)[1:] for line in lines[5:]}
  assert summary["**mean**"][2:6] == ["97.77", "97.60", "96.00", "96.93"]
  assert summary["**min**"][3] == "96.90" and summary["**max**"][4] == "96.80"
  # eval.json files without them (nn_eval.py run with --config.eval.knn_k=0, or older): no empty columns.
  nan = float("nan")
  lines = digits_seeds.results_table([row + (nan, nan, nan, nan) for row in ROWS], baselines=True)
  assert lines == digits_seeds.results_table(ROWS, baselines=True)


def test_digits_seeds_parses_config_flags_as_the_scripts_do(tmp_path):
  # Parsed before anything runs: a misspelt field is one error line, exit 2, no run folder.
  result = scriptrun.run(
    "benchmarks.digits_seeds", "--config=config.py:digits", "--config.pretrain.epoch=1", f"--runs={tmp_path}/runs"
  )
  assert result.returncode == 2, result.stderr[-2000:]
  assert "config.pretrain has no field 'epoch'; did you mean --config.pretrain.epochs?" in scriptrun.error_line(result)
  assert not (tmp_path / "runs").exists()


def test_activation_memory_runs_as_a_module_with_config_overrides():
  result = scriptrun.run(
    "benchmarks.activation_memory",
    "--config=config.py:digits",
    "--config.pretrain.batch_size=16",
    "--precisions=float32",
  )
  assert result.returncode == 0, result.stderr[-2000:]
  # 2 x 5 x 10 supports + 2 x 16 large views at 16 px, 6 x 16 small views at 10 px
  assert "digits: WRN-10-1, one PAWS step on one device: 132 x 16 px + 96 x 10 px crops" in result.stdout
  assert "float32: estimated peak" in result.stdout and "mixed_float16" not in result.stdout
