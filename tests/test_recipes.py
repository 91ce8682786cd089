"""Recipes (recipes/*.toml): they parse, `config show` prints what would run, and
mealv2_resnet50_224 holds the original's values -- written here from the original
code (szq0214/MEAL-V2), not from our own output."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from stage2_student_distill.app.cli import main
from common.config import ConfigError, load_config
from common.models import WeightsError, create_model, read_weights
from common.recipes import list_recipes, read_recipe, recipe_names
from stage2_student_distill.checkpoint import save_model
from stage2_student_distill.hub import load_checkpoint_model
from stage2_student_distill.schedule import discriminator_base_lr, lr_factor
from stage2_student_distill.student import create_student
from test_distill import data, distill_config  # noqa: F401  (the tiny manifests + cache fixture)

RELEASED = {  # one per trainable released model (MEAL-V2 README release table) + the FKD variant
    "mealv2_resnet50_224", "mealv2_resnet50_cutmix", "mealv2_resnet50_380", "mealv2_mobilenetv3_small_075",
    "mealv2_mobilenetv3_small_100", "mealv2_mobilenetv3_large_100", "mealv2_efficientnet_b0", "mealv2_resnet50_fkd",
}


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_every_released_model_has_a_recipe_that_parses_and_documents_itself():
    assert set(recipe_names()) == RELEASED
    for recipe in list_recipes():
        cfg = load_config(recipe=recipe.name)
        for needle in ("torchrun --nproc-per-node 8", "teacher-cache", "distill", "evaluate", "Expected:",
                       "Hardware:", "Cache: C =", "GB", "Teacher cost"):
            assert needle in recipe.header, f"{recipe.name}: header lacks {needle!r}"
        assert f"C = {cfg.crops.num_crops} crops" in recipe.header
        assert cfg.distill.pretrained and cfg.distill.disc_lr_mode == "as_released"
        # the recipe's own files: a pass of crops_per_image cached crops fits the cache
        assert cfg.distill.crops_per_image <= cfg.crops.num_crops


def test_pipeline_recipes_lists_one_line_each():
    result = cli("recipes")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert sorted(line.split()[0] for line in lines) == sorted(RELEASED)
    assert cli("recipes", "--show", "mealv2_resnet50_380").output.startswith("mealv2_resnet50_380: ")


# The original's values, from szq0214/MEAL-V2 (quoted lines):
# models/model_factory.py, create_model:  model.LR_REGIME = [0, 100, 0.01, 101, 300, 0.001]
ORIGINAL_LR_REGIME = [0, 100, 0.01, 101, 300, 0.001]
# README.md "224 x 224 ResNet-50" (and script/train.sh line 2):
#   python train.py ... --batch-size 512 ... --model resnet50 --epochs 180 --teacher-model gluon_senet154,gluon_resnet152_v1s
ORIGINAL_BATCH, ORIGINAL_EPOCHS = 512, 180
# timm 0.2.1's names for gluon_senet154 and gluon_resnet152_v1s are timm 1.x's tags:
ORIGINAL_TEACHERS = ("senet154.gluon_in1k", "resnet152s.gluon_in1k")
# opts.py add_training_flags:  --momentum default=0.9;  --weight-decay default=0;  --d_lr default=1e-4
ORIGINAL_MOMENTUM, ORIGINAL_WEIGHT_DECAY, ORIGINAL_D_LR = 0.9, 0.0, 1e-4
# models/model_factory.py _create_model:  model = timm.create_model(model_name.lower(), pretrained=True)
# with timm 0.2.1 (README.md "Requirements"), whose resnet50 URL was resnet50_ram-a26f946b.pth:
ORIGINAL_STUDENT = "resnet50.ram_in1k"
# imagenet.py ImageNet (is_train=False):  transforms.Resize(int(256/224*im_size)), transforms.CenterCrop(im_size)
# (torchvision's default interpolation: bilinear);  MEAN = [0.485, 0.456, 0.406], STD = [0.229, 0.224, 0.225]
ORIGINAL_CROP_PCT = 224 / int(256 / 224 * 224)
ORIGINAL_MEAN, ORIGINAL_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GPUS = 8  # the recipe's batch_size is per process under torchrun on 8 GPUs


def original_lr(epoch: int) -> float:
    """train.py LearningRateRegime.get_lr: intervals (start, end, lr), inclusive."""
    for start, end, lr in zip(ORIGINAL_LR_REGIME[0::3], ORIGINAL_LR_REGIME[1::3], ORIGINAL_LR_REGIME[2::3]):
        if start <= epoch <= end:
            return lr
    raise AssertionError(epoch)


def test_config_show_of_mealv2_resnet50_224_is_the_original(tmp_path):
    result = cli("config", "show", "--recipe", "mealv2_resnet50_224", "distill")
    assert result.exit_code == 0, result.output
    shown = tomllib.loads(result.output)
    o, d, p = shown["optim"], shown["distill"], shown["preprocess"]
    assert tuple(shown["teacher_cache"]["teachers"]) == ORIGINAL_TEACHERS
    assert o["epochs"] == ORIGINAL_EPOCHS
    assert o["batch_size"] * GPUS == ORIGINAL_BATCH
    assert (o["momentum"], o["weight_decay"]) == (ORIGINAL_MOMENTUM, ORIGINAL_WEIGHT_DECAY)
    assert d["student"] == ORIGINAL_STUDENT and d["pretrained"] is True
    assert p["interpolation"] == "bilinear" and p["crop_pct"] == pytest.approx(ORIGINAL_CROP_PCT)
    assert tuple(p["mean"]) == ORIGINAL_MEAN and tuple(p["std"]) == ORIGINAL_STD
    # lr and milestones: the schedule gives the original's lr in every epoch of the run
    path = tmp_path / "shown.toml"
    path.write_text(result.output)
    cfg = load_config(path)
    for epoch in range(ORIGINAL_EPOCHS):
        assert o["lr"] * lr_factor(cfg.optim, epoch, 0, 100) == pytest.approx(original_lr(epoch)), epoch
    # the discriminator: --d_lr, then overwritten by the student's lr every epoch (train.py _set_learning_rate)
    assert d["disc_lr"] == ORIGINAL_D_LR and discriminator_base_lr(cfg) == o["lr"]
    # and the printed TOML is exactly the config that would run
    assert cfg == load_config(recipe="mealv2_resnet50_224")


def test_flags_and_set_win_over_the_recipe():
    result = cli("--recipe", "mealv2_resnet50_224", "--set", "optim.lr=0.1",
                 "config", "show", "distill", "--epochs", "3", "--student", "resnet18")
    assert result.exit_code == 0, result.output
    shown = tomllib.loads(result.output)
    assert (shown["optim"]["epochs"], shown["optim"]["lr"], shown["distill"]["student"]) == (3, 0.1, "resnet18")
    assert shown["optim"]["lr_decay_epochs"] == [101]  # the rest is still the recipe's
    plain = tomllib.loads(cli("config", "show").output)
    assert plain["optim"]["lr_decay_epochs"] == [80, 160]  # no recipe: pipeline.toml


def test_config_show_of_teacher_cache_flags_and_refusals():
    shown = tomllib.loads(cli("--recipe", "mealv2_resnet50_380", "config", "show", "teacher-cache", "--topk", "3").output)
    assert shown["teacher_cache"]["topk"] == 3 and shown["optim"]["img_size"] == 380
    result = cli("config", "show", "export", "--out", "x.onnx")  # would run, so it is refused
    assert result.exit_code != 0 and "not 'export'" in result.output


def test_bad_recipes_are_one_line_errors(tmp_path):
    result = cli("--recipe", "mealv2_resnet51", "config", "show")
    assert result.exit_code == 1 and "unknown recipe 'mealv2_resnet51'" in result.output
    assert "mealv2_resnet50_224" in result.output and "Traceback" not in result.output
    own = tmp_path / "mine.toml"
    own.write_text("# mine: my recipe\n[optim]\nepochz = 3\n")
    with pytest.raises(ConfigError, match=r"optim\.epochz"):
        load_config(recipe=str(own))
    own.write_text("# mine: my recipe\n[optim]\nepochs = 3\n")
    assert load_config(recipe=str(own)).optim.epochs == 3
    assert read_recipe(str(own)).summary == "my recipe"


def test_student_hub_init_offline_names_both_sources(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying DNS
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))  # never a developer's cached copy
    cfg = load_config(recipe="mealv2_resnet50_224")
    with pytest.raises(WeightsError) as e:
        create_student(cfg, 1000)
    message = str(e.value)
    assert "\n" not in message
    assert "resnet50.ram_in1k" in message and "resnet50_ram-a26f946b.pth" in message
    assert "--student-weights PATH" in message
    # --student-weights wins over the hub: nothing is fetched
    model, _ = create_model("test_resnet", 10)
    weights = tmp_path / "student.pth"
    torch.save(model.state_dict(), weights)
    cfg = cfg.replace(**{"distill.student": "test_resnet", "distill.student_weights": str(weights)})
    student, _ = create_student(cfg, 10)
    assert torch.equal(student.state_dict()["fc.weight"], model.state_dict()["fc.weight"])


def test_recipe_preprocessing_is_recorded_and_read_back_by_every_user(data, tmp_path):  # noqa: F811
    """A distill run with [preprocess] and the as-released discriminator lr, then evaluate/hub read it."""
    from stage2_student_distill.evaluate import run_evaluate
    from stage2_student_distill.train import run_distill

    cfg = distill_config(data, tmp_path / "run", **{
        "optim.epochs": 1, "preprocess.interpolation": "bilinear", "preprocess.crop_pct": 0.875,
        "preprocess.mean": [0.485, 0.456, 0.406], "preprocess.std": [0.229, 0.224, 0.225],
        "distill.disc_lr_mode": "as_released",
    })
    timm_default, = [create_model("test_resnet", 3, input_size=32)[1]]
    assert (timm_default.interpolation, timm_default.crop_pct) != ("bilinear", 0.875)  # the override matters
    run_distill(cfg)
    best = tmp_path / "run" / "best.pt"
    _, meta = read_weights(best)
    expected = {"input_size": 32, "interpolation": "bilinear", "crop_pct": 0.875,
                "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert meta["preprocess"] == expected
    assert create_model(meta["model"], 3, weights=best)[1].to_dict() == expected  # evaluate's path
    assert load_checkpoint_model(best).preprocess.to_dict() == expected  # predict, export, hub
    assert run_evaluate(best, data["val"], cfg)["images"] == 6
    # as released: the discriminator ran at the student's lr (0.05 here), not disc_lr
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["disc_lr"] == record["lr"] == 0.05
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["optimizers"]["discriminator"]["param_groups"][0]["lr"] == 0.05


def test_checkpoints_without_a_preprocess_override_keep_the_models_own(tmp_path):
    model, pre = create_model("test_resnet", 3)
    path = tmp_path / "old.pt"
    save_model(path, model, {"model": "test_resnet", "num_classes": 3, "preprocess": pre.to_dict()})
    assert load_checkpoint_model(path).preprocess == pre


def test_an_unknown_student_is_not_reported_as_a_download_failure():
    cfg = load_config(recipe="mealv2_resnet50_224").replace(**{"distill.student": "resnet51"})
    with pytest.raises(WeightsError, match="unknown model 'resnet51'"):
        create_student(cfg, 1000)


def test_recipes_ship_with_the_package(tmp_path):
    """recipes/*.toml ship as package data of `common` (through the common/recipe_files link)."""
    from common.recipes import RECIPES_DIR

    repo = Path(__file__).resolve().parent.parent
    project = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "recipe_files/*.toml" in project["package-data"]["common"]
    assert sorted(p.name for p in RECIPES_DIR.glob("*.toml")) == sorted(p.name for p in (repo / "recipes").glob("*.toml"))
    shown = tmp_path / "default.toml"
    shown.write_text(cli("config", "show").output)
    assert load_config(shown) == load_config()  # without a recipe, too, the output is the config
