"""common/config.py: pipeline.toml states the defaults; bad keys and types fail by name."""
import dataclasses

import pytest
from click.testing import CliRunner

from stage2_student_distill.app.cli import main
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


@pytest.mark.parametrize("args, key", [
    (["--set", "runtime.seed=-1"], "runtime.seed"),  # once an OverflowError traceback
    (["--set", f"runtime.seed={2**63}"], "runtime.seed"),
    (["--set", "crops.seed=-5"], "crops.seed"),
    (["--set", "runtime.num_workers=-1"], "runtime.num_workers"),
    (["--set", "optim.epochs=0"], "optim.epochs"),
    (["--set", "optim.eval_batch_size=0"], "optim.eval_batch_size"),
    (["--set", "optim.lr=-0.1"], "optim.lr"),
    (["--set", "optim.momentum=1.5"], "optim.momentum"),
    (["--set", "optim.weight_decay=-1e-4"], "optim.weight_decay"),
    (["--set", "optim.lr_decay_epochs=[0, 10]"], "optim.lr_decay_epochs"),
    (["--set", "optim.lr_decay_factor=0"], "optim.lr_decay_factor"),
    (["--set", "optim.warmup_epochs=-1"], "optim.warmup_epochs"),
    (["--set", "optim.log_every=0"], "optim.log_every"),
    (["--set", "teacher_cache.topk=0"], "teacher_cache.topk"),
    (["--set", "teacher_cache.min_top1_over_chance=-1"], "teacher_cache.min_top1_over_chance"),
    (["--set", "crops.num_crops=0"], "crops.num_crops"),
    (["--set", "crops.flip_p=1.5"], "crops.flip_p"),
    (["--set", "distill.cutmix_prob=2"], "distill.cutmix_prob"),
    (["--set", "distill.cutmix_alpha=0"], "distill.cutmix_alpha"),
    (["--set", "train.label_smoothing=1.0"], "train.label_smoothing"),
    (["--set", "demo.train_images=0"], "demo.train_images"),
    (["--set", "crops.scale=[0.5, 1.5]"], "crops.scale"),
])
def test_out_of_range_values_exit_1_naming_the_key_without_traceback(args, key, tmp_path):
    result = CliRunner().invoke(main, [*args, "distill", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"config key '{key}'" in lines[0], result.output
    assert "Traceback" not in result.output


def test_seed_flag_out_of_range_is_a_config_error(tmp_path):
    result = CliRunner().invoke(main, ["distill", "--seed", "-1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "config key 'runtime.seed' = -1: must be in 0..2**63-1" in result.output


def test_the_largest_accepted_seed_works_everywhere_a_seed_goes():
    """2**63 - 1 (TOML's largest integer) is accepted, and every consumer of a seed takes it."""
    import numpy as np

    from common.crops import boxes
    from common.runtime import seed_everything
    from stage2_student_distill.plan import epoch_crops, shuffled_images

    top = 2**63 - 1
    cfg = load_config(None, {"runtime.seed": str(top), "crops.seed": str(top)})
    assert cfg.runtime.seed == top and cfg.crops.seed == top
    seed_everything(top)
    ids = np.arange(4)
    b = boxes(top, ids, np.zeros(4, dtype=np.int64), np.full(4, 20), np.full(4, 10))
    assert (b.as_array()[:, 0] + b.as_array()[:, 2] <= 20).all()
    assert sorted(shuffled_images(top, 0, 4).tolist()) == [0, 1, 2, 3]
    assert epoch_crops(top, ids, 0, 3).shape[0] == 4
    seed_everything(0)
