"""Presets are locked; overrides of unknown fields or wrong types fail with a clear message."""
import pytest

import config
from tests import scriptrun


def test_presets_are_locked_and_hold_the_paper_values():
  c = config.get_config("cifar10")
  with pytest.raises(AttributeError):
    c.pretrain.bogus = 1
  assert (c.pretrain.batch_size, c.pretrain.images_per_class, c.pretrain.epochs) == (256, 64, 600)
  assert (c.pretrain.start_lr, c.pretrain.lr, c.pretrain.final_lr) == (0.8, 3.2, 0.032)
  assert c.data.labeled_per_class * 10 == 4000
  assert config.get_config("digits").data.dataset == "digits"
  with pytest.raises(ValueError, match="unknown preset"):
    config.get_config("imagenet")


@pytest.mark.parametrize("override,message", [
    ("--config.pretrain.bogus=1", "bogus"),
    ("--config.pretrain.epochs=ten", "epochs"),
])
def test_bad_overrides_exit_nonzero_naming_the_field(override, message, tmp_path):
  result = scriptrun.run("paws_train.py", "--config=config.py:digits", override, f"--workdir={tmp_path}/w")
  assert result.returncode != 0
  assert message in result.stderr
  assert not (tmp_path / "w").exists()  # nothing written


@pytest.mark.parametrize("override,message", [
    ("--config.pretrain.images_per_class=5", "images_per_class=5"),
    ("--config.pretrain.classes_per_batch=11", "classes_per_batch=11"),
    ("--config.pretrain.batch_size=5000", "batch_size=5000"),
])
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
