"""common/config.py: pipeline.toml states the defaults; bad keys and types fail by name."""
import dataclasses

import pytest
from click.testing import CliRunner

from common.cli import main
from common.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config


def test_pipeline_toml_restates_every_default():
    text = DEFAULT_CONFIG_PATH.read_text()
    cfg = Config()
    for table in dataclasses.fields(cfg):
        header = f"\n[{table.name}]\n"
        assert header in text
        body = "\n" + text.split(header)[1].split("\n[")[0]
        for key in dataclasses.fields(getattr(cfg, table.name)):
            assert f"\n{key.name} = " in body, f"{table.name}.{key.name} missing"
    assert load_config() == cfg


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_config().optim.lr = 1.0


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[optim]\nepochs = 3\nlr_decay_epochs = [1, 2]\n[teacher_cache]\nteachers = ["a"]\n')
    cfg = load_config(path, {"optim.epochs": "5", "teacher_cache.teachers": "x,y", "crops.scale": "[0.5, 1.0]"})
    assert cfg.optim.epochs == 5 and cfg.optim.lr_decay_epochs == (1, 2)
    assert cfg.teacher_cache.teachers == ("x", "y")
    assert cfg.crops.scale == (0.5, 1.0)
    assert cfg.optim.lr == Config().optim.lr


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[optim]\nepoch = 3\n", "optim.epoch"),
        ("[optimizer]\nlr = 3\n", "[optimizer]"),
        ('[optim]\nepochs = "three"\n', "optim.epochs"),
        ("[crops]\nscale = [0.5]\n", "crops.scale"),
        ("[crops]\nscale = [0.9, 0.5]\n", "crops.scale"),
        ('[runtime]\nprecision = "fp8"\n', "runtime.precision"),
        ("[optim\n", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert needle in str(e.value)


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_cli_help_lists_commands_and_bad_set_is_reported():
    runner = CliRunner()
    out = runner.invoke(main, ["--help"])
    assert out.exit_code == 0
    for cmd in ("manifest", "teacher-cache", "cache", "distill", "train", "evaluate"):
        assert cmd in out.output
    out = runner.invoke(main, ["--set", "optim.nope=1", "distill", "--out", "/nonexistent"])
    assert out.exit_code != 0 and "optim.nope" in out.output
