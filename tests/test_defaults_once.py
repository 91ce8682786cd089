"""Issue 24 item 6, defaults once: one unit for accuracies (percent), one choice list per setting,
one alias table, one way of mapping flags to config keys.

Accuracies: stage 1 stored the teachers' top-1/top-5 as fractions before this change, and caches written
then must still read as percent everywhere. The expected figures are the old fractions times 100, worked
out by hand from the record below, never read back from a run.
"""
from __future__ import annotations

import dataclasses
import json
import re
from types import SimpleNamespace

import pytest
import zarr
from click.testing import CliRunner

from common.cache_format import CacheReader
from stage2_student_distill.app.cli import main
from stage1_fixtures import make_manifest
from stage1_fixtures import config as stage1_config
from stage1_teacher_cache.run import run as teacher_cache
from stage1_teacher_cache.teacher_eval import read_teacher_eval, student_caught_up, summarize_hits
from stage2_student_distill import experiment as ex
from stage2_student_distill.train import _teacher_eval_on

MANIFEST = {"hash": "h", "path": "val.parquet", "num_images": 10}
# As stage 1 wrote it before accuracies were stored in percent: no "unit", fractions. 10 images, 3 classes:
# test_resnet 8 right (top-5 all 10), test_efficientnet 3 (9), their mean 6 (10); without one, the other alone.
OLD_RECORD = {
    "manifest": MANIFEST,
    "crop": "centre (each teacher's crop_pct)",
    "teachers": {"test_resnet": {"top1": 0.8, "top5": 1.0}, "test_efficientnet": {"top1": 0.3, "top5": 0.9}},
    "ensemble": {"top1": 0.6, "top5": 1.0},
    "leave_one_out": {"test_resnet": {"top1": 0.3, "top5": 0.9}, "test_efficientnet": {"top1": 0.8, "top5": 1.0}},
    "best_teacher": {"name": "test_resnet", "top1": 0.8},
    "chance_top1": 1 / 3,
}
HITS = [[8, 10], [3, 9], [6, 10], [3, 9], [8, 10]]  # the same figures as hit counts (layout of hits_of_probs)


def test_an_old_fraction_record_reads_as_the_percent_record_stage_1_writes_now():
    new = summarize_hits(["test_resnet", "test_efficientnet"], HITS, 10, 3, MANIFEST)
    assert new["unit"] == "percent"
    assert new["teachers"]["test_resnet"] == {"top1": 80.0, "top5": 100.0}
    assert new["chance_top1"] == pytest.approx(100 / 3)
    read = read_teacher_eval(OLD_RECORD)
    assert flat(read) == pytest.approx(flat(new)) and read.keys() == new.keys()
    assert read_teacher_eval(new) is new  # a percent record is not converted twice
    assert OLD_RECORD["teachers"]["test_resnet"]["top1"] == 0.8  # the stored record is left as it was
    assert read_teacher_eval(None) is None


def flat(record: dict, prefix: str = "") -> dict:
    """Every number of a record by its dotted path (the strings must match exactly)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


@pytest.fixture(scope="module")
def old_cache(tmp_path_factory):
    """A real cache whose ``teacher_eval`` attribute is an old fraction record."""
    tmp = tmp_path_factory.mktemp("old-eval")
    manifest = make_manifest(tmp, "train")
    cache = tmp / "cache"
    teacher_cache(stage1_config(manifest, cache))
    zarr.open_group(str(cache), mode="r+").attrs.update({"teacher_eval": OLD_RECORD})
    return {"cache": cache, "manifest": manifest, "tmp": tmp}


def test_cache_info_shows_an_old_cache_in_percent(old_cache):
    cli = CliRunner()
    shown = cli.invoke(main, ["cache", "info", str(old_cache["cache"])])
    assert shown.exit_code == 0, shown.output
    assert "val top-1 80.00% top-5 100.00%; ensemble without it top-1 30.00%" in shown.stdout
    assert "val top-1 30.00% top-5 90.00%; ensemble without it top-1 80.00%" in shown.stdout
    assert "val top-1 60.00% top-5 100.00%, -20.00 points over the best single teacher test_resnet (80.00%)" \
        in shown.stdout
    assert "teacher test_efficientnet lowers the ensemble: without it 80.00%, with it 60.00% top-1" in shown.stdout

    info = json.loads(cli.invoke(main, ["cache", "info", str(old_cache["cache"]), "--json"]).stdout)
    assert info["ensemble_eval"] == {"top1": 60.0, "top5": 100.0}
    assert info["best_teacher_eval"] == {"name": "test_resnet", "top1": 80.0}
    assert {t["name"]: t["eval"]["top1"] for t in info["teachers"]} == {"test_resnet": 80.0, "test_efficientnet": 30.0}


def test_the_experiment_driver_and_distill_read_an_old_cache_in_percent(old_cache):
    read = ex.teacher_top1(ex.cache_evaluation(old_cache["cache"]))
    assert read == ex.TeacherTop1({"test_resnet": 80.0, "test_efficientnet": 30.0}, 60.0)
    assert ex.teacher_top1(OLD_RECORD) == read  # an old results JSON's copy of the record, too

    # distill keeps the record only for its own validation images (same content hash), in percent
    evaluation = _teacher_eval_on(CacheReader(str(old_cache["cache"])), SimpleNamespace(content_hash="h"))
    assert evaluation["ensemble"] == {"top1": 60.0, "top5": 100.0}
    assert student_caught_up(59.6, evaluation).startswith("the student (59.60% top-1) has caught up with its "
                                                          "teachers' ensemble (60.00% on the same 10 images")
    assert student_caught_up(59.4, evaluation) is None  # 0.6 points under: more than CAUGHT_UP_POINTS


def test_the_serve_cache_page_shows_an_old_cache_in_percent(old_cache):
    pytest.importorskip("flask")
    from stage2_student_distill.app.serve.app import Served, create_app

    served = Served(cache=old_cache["cache"], manifest=old_cache["manifest"])
    assert served.cache.wait(60)
    page = create_app(served).test_client().get("/cache").text
    facts = re.search(r'<table class="facts".*?</table>', page, flags=re.S).group(0)
    text = " ".join(re.sub(r"<[^>]+>", " ", facts).split())
    assert "val top-1 80.00%, top-5 100.00%; ensemble without it top-1 30.00%" in text
    assert "val top-1 60.00%, top-5 100.00%; best single teacher test_resnet 80.00%" in text


# --------------------------------------------------------------------------- each choice list once


def _choices(command: str, flag: str) -> tuple[str, ...]:
    option = next(p for p in main.commands[command].params if flag in p.opts)
    return tuple(option.type.choices)


def test_the_cli_offers_exactly_the_choices_the_config_accepts():
    from common import config as c
    from common import loader_kind, models

    assert _choices("teacher-cache", "--loader") == c.LOADERS
    for command in ("distill", "train"):
        assert _choices(command, "--loader") == c.LOADERS
        assert _choices(command, "--schedule") == c.SCHEDULES
        assert _choices(command, "--log") == c.LOG_SINKS
        assert _choices(command, "--precision") == c.PRECISIONS
    assert loader_kind.LOADERS is c.LOADERS and models.INTERPOLATIONS is c.INTERPOLATIONS
    # and the config refuses anything else, listing the same choices
    for key, choices in {"optim.schedule": c.SCHEDULES, "optim.log": c.LOG_SINKS, "runtime.precision": c.PRECISIONS,
                         "teacher_cache.loader": c.LOADERS, "distill.disc_lr_mode": c.DISC_LR_MODES}.items():
        with pytest.raises(c.ConfigError, match=f"'{key}' = 'nope': use one of {', '.join(choices)}$"):
            c.load_config(None, {key: "nope"})
    with pytest.raises(c.ConfigError, match="use bilinear, bicubic, nearest or"):
        c.load_config(None, {"preprocess.interpolation": "lanczos"})


# --------------------------------------------------------------------------- one table of model names


def test_teacher_aliases_and_released_models_come_from_one_table():
    from common.models import ALIASES, MODEL_NAMES, resolve_name
    from stage2_student_distill.hub import HUB_MODELS, hub_model

    assert set(ALIASES).isdisjoint(HUB_MODELS) and set(ALIASES) | set(HUB_MODELS) == set(MODEL_NAMES)
    assert resolve_name("senet154") == "senet154.gluon_in1k" and resolve_name("resnest269") == "resnest269e.in1k"
    assert resolve_name("efficientnet_b4") == "tf_efficientnet_b4.ns_jft_in1k"
    # a released model's name is the hub's (`predict --hub`), never a timm alias: as before the merge
    assert resolve_name("mealv2_resnest50") == "mealv2_resnest50"
    released = hub_model("mealv2_resnest50_380x380")
    assert (released.arch, released.file_name, released.input_size) == ("resnet50", "MEALV2_ResNet50_380.pth", 380)
    assert hub_model("mealv2_efficientnet_b0").arch == "tf_efficientnet_b0"


# --------------------------------------------------------------------------- flags -> config keys, one way


def _options(command, path=()):
    import click

    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _options(sub, (*path, name))
    else:
        yield from ((path, p) for p in command.params if isinstance(p, click.Option))


def test_every_flag_that_sets_a_config_key_is_declared_the_same_way():
    from common.config import Config

    tables = Config().to_dict()
    keyed = [(path, p) for path, p in _options(main) if "__" in (p.name or "")]
    assert {path[0] for path, _ in keyed} >= {"teacher-cache", "distill", "train", "evaluate", "predict", "serve", "demo"}
    for path, option in keyed:
        table, key = option.name.split("__")
        assert key in tables[table], (path, option.opts)
        assert option.help.endswith(f"[{table}.{key}]"), (path, option.opts)


@pytest.mark.parametrize("command, flags, expected", [
    ("teacher-cache", ["--topk", "3", "--num-crops", "2", "--input-size", "a=40", "--no-pretrained"],
     {"teacher_cache": {"topk": 3, "input_sizes": ["a=40"], "pretrained": False}, "crops": {"num_crops": 2}}),
    ("distill", ["--schedule", "cosine", "--no-discriminator", "--device", "cpu"],
     {"optim": {"schedule": "cosine"}, "distill": {"discriminator": False}, "runtime": {"device": "cpu"}}),
    ("predict", ["--hub", "mealv2_resnest50", "--device", "cpu", "x.png"], {"runtime": {"device": "cpu"}}),
    ("demo", ["--train-images", "50", "--out", "elsewhere"], {"demo": {"train_images": 50, "out": "elsewhere"}}),
])
def test_config_show_resolves_each_commands_flags_to_their_keys(command, flags, expected):
    import tomllib

    shown = CliRunner().invoke(main, ["config", "show", command, *flags])
    assert shown.exit_code == 0, shown.output
    resolved = tomllib.loads(shown.stdout)
    for table, values in expected.items():
        assert {k: resolved[table][k] for k in values} == values


# --------------------------------------------------------------------------- [demo] holds only the demo's own

# The values the demo ran with when [demo] re-declared them (img_size ... eval_every, crop_scale, cache_batch_size)
DEMO_BEFORE = {"optim": {"img_size": 32, "batch_size": 128, "eval_batch_size": 500, "lr": 0.05, "schedule": "cosine",
                         "weight_decay": 5e-5, "loader": "torch", "eval_every": 10},
               "crops": {"num_crops": 16, "scale": [0.64, 1.0]}, "teacher_cache": {"batch_size": 256}}


def _shown(*args: str) -> dict:
    import tomllib

    shown = CliRunner().invoke(main, ["config", "show", *args])
    assert shown.exit_code == 0, shown.output
    return tomllib.loads(shown.stdout)


def test_the_demo_runs_with_the_settings_it_had_and_declares_none_of_them_twice():
    from common.config import DemoConfig
    from stage2_student_distill.app.demo import demo_config

    assert {f.name for f in dataclasses.fields(DemoConfig)} == {
        "out", "data_dir", "source_dir", "train_images", "val_images", "teacher_train_images", "teachers",
        "teacher_epochs", "student", "student_epochs"}
    demo = _shown("demo")
    for table, values in DEMO_BEFORE.items():
        assert {k: demo[table][k] for k in values} == values
        assert {k: v for k, v in demo_config().to_dict()[table].items() if k in values} == values
    # the demo's layer is its own: other commands keep pipeline.toml's values
    assert _shown("distill")["optim"]["lr"] == 0.01 and _shown("distill")["crops"]["num_crops"] == 8
    # and --set wins over it, as over a recipe
    assert _shown("demo", "--out", "x")["demo"]["out"] == "x"
    assert CliRunner().invoke(main, ["--set", "optim.lr=0.2", "config", "show", "demo"]).stdout.count("lr = 0.2\n") == 1
