"""stage1_teacher_cache: the cached targets are the ensemble's, on the cached crops; resume, refusal, checks."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from common.cache_format import CacheError, CacheReader, verify_cache
from common.cache_storage import restore_targets
from common.crops import image_boxes
from common.manifest import load_manifest
from common.models import WeightsError, create_model
from common.render import decode, render_crops
from stage1_fixtures import INPUT_SIZES, TEACHERS, config, dataset, kill_inside_shard_1, make_manifest, overrides  # noqa: F401
from stage1_teacher_cache.evaluate import TeacherCheckError
from stage1_teacher_cache.run import run
from stage1_teacher_cache.views import dali_available


@pytest.fixture(scope="module")
def built(dataset):  # noqa: F811
    """One uninterrupted run: the reference for the other tests (which must not modify it)."""
    out = dataset["tmp"] / "reference-cache"
    summary = run(config(dataset["train"], out))
    return out, summary


def read_all(path) -> dict[str, np.ndarray]:
    reader = CacheReader(path)
    return {name: np.asarray(reader.arrays[name][:]) for name in ("boxes", "flip", "topk_index", "topk_prob")}


def recompute_targets(manifest_path, boxes, flips, teachers, temperature=1.0) -> torch.Tensor:
    """The ensemble target of every stored crop, computed here without stage1's code: [N, C, classes]."""
    m = load_manifest(manifest_path)
    sizes = dict(s.split("=") for s in INPUT_SIZES)
    out = []
    for i in range(m.num_images):
        image = decode(m.abspath(i))
        per_teacher = []
        for name, (model, pre) in teachers.items():
            crops = render_crops(image, boxes[i], flips[i], int(sizes[name]), pre.interpolation).float() / 255
            x = (crops - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(1, 3, 1, 1)
            with torch.no_grad():
                per_teacher.append(torch.softmax(model(x) / temperature, -1))
        out.append(torch.stack(per_teacher).mean(0))
    return torch.stack(out)


def seeded_teachers(num_classes: int, seed: int = 0, weights: dict | None = None) -> dict:
    """The same teachers a run builds: seeded random init (or the given weight files), eval mode."""
    sizes = dict(s.split("=") for s in INPUT_SIZES)
    teachers = {}
    for name in TEACHERS:
        torch.manual_seed(seed)
        model, pre = create_model(name, num_classes, weights=(weights or {}).get(name), input_size=int(sizes[name]))
        teachers[name] = (model.eval(), pre)
    return teachers


def assert_targets_match(cache, manifest_path, teachers):
    data = read_all(cache)
    expected = recompute_targets(manifest_path, data["boxes"], data["flip"], teachers)
    k = data["topk_index"].shape[-1]
    top = expected.topk(k, dim=-1)
    assert np.array_equal(data["topk_index"], top.indices.numpy())
    np.testing.assert_allclose(data["topk_prob"].astype(np.float32), top.values.numpy(), atol=1e-3, rtol=1e-3)
    return data


def test_cache_holds_the_ensemble_of_the_stored_crops(built, dataset):  # noqa: F811
    cache, summary = built
    m = load_manifest(dataset["train"])
    data = read_all(cache)

    expected_boxes = image_boxes(0, m.image_ids, m.widths, m.heights, 3)
    assert np.array_equal(data["boxes"], expected_boxes.as_array())
    assert np.array_equal(data["flip"], expected_boxes.flip)
    assert data["flip"].any() and not data["flip"].all()

    assert_targets_match(cache, dataset["train"], seeded_teachers(m.num_classes))
    dense = restore_targets(data["topk_index"].reshape(-1, 2), data["topk_prob"].reshape(-1, 2), m.num_classes)
    torch.testing.assert_close(dense.sum(-1), torch.ones(len(dense)))
    assert (dense > 0).all()

    assert summary["images"] == 9 and summary["crops"] == 27 and summary["shards_written"] == 3
    assert summary["bytes_on_disk"] > 0 and summary["bytes_per_crop"] == summary["bytes_on_disk"] / 27
    assert verify_cache(cache, manifest_hash=m.content_hash) == []


def test_attributes_describe_the_cache(built, dataset):  # noqa: F811
    attrs = CacheReader(built[0]).attrs
    json.dumps(attrs)  # plain JSON all the way down
    assert attrs["manifest"] == {"hash": load_manifest(dataset["train"]).content_hash, "num_images": 9}
    assert attrs["manifest_path"] == str(dataset["train"])
    assert attrs["class_names"] == ["ant", "bee", "cat"]
    assert [t["name"] for t in attrs["teachers"]] == list(TEACHERS)
    assert [t["preprocess"]["input_size"] for t in attrs["teachers"]] == [32, 40]
    assert attrs["teachers"][1]["preprocess"]["interpolation"] == "bicubic"
    assert attrs["ensemble"] == {"rule": "mean_softmax", "temperature": 1.0}
    assert attrs["crops"]["seed"] == 0 and attrs["crops"]["num_crops"] == 3
    assert attrs["storage"] == {"k": 2, "images_per_shard": 4, "residual": "uniform",
                                "index_dtype": "uint16", "prob_dtype": "float16"}
    assert attrs["config"]["teacher_cache"]["batch_size"] == 7
    assert attrs["teacher_eval"] is None


def test_rerun_skips_complete_shards(built, dataset):  # noqa: F811
    cache = dataset["tmp"] / "rerun-cache"
    shutil.copytree(built[0], cache)
    summary = run(config(dataset["train"], cache))
    assert summary["shards_written"] == 0 and summary["shards_skipped"] == 3
    assert summary["shards_complete"] == 3


def test_kill_9_then_rerun_equals_an_uninterrupted_run(built, dataset, tmp_path):  # noqa: F811
    cache, flag = tmp_path / "cache", tmp_path / "in-shard-1"
    kill_inside_shard_1(overrides(dataset["train"], cache), flag, tmp_path, "shard 1", timeout_s=60)
    killed = CacheReader(cache, require_complete=False)
    assert killed.complete.tolist() == [True, False, False]
    assert any("shard 1" in p and "incomplete" in p for p in verify_cache(cache))

    summary = run(config(dataset["train"], cache))
    assert summary["shards_written"] == 2 and summary["shards_skipped"] == 1
    resumed, reference = read_all(cache), read_all(built[0])
    for name in reference:
        assert np.array_equal(resumed[name], reference[name]), name
    assert verify_cache(cache) == []


@pytest.mark.parametrize(
    "change, named",
    [
        ({"data.manifest": "val"}, ("manifest: cache has", "'num_images': 6")),
        ({"teacher_cache.teachers": ["test_resnet"]}, ("teachers: cache has",)),
        ({"crops.seed": 1}, ("crops: cache has", "'seed': 1")),
        ({"teacher_cache.topk": 3}, ("storage: cache has", "'k': 3")),
    ],
    ids=["manifest", "teacher-set", "crop-seed", "topk"],
)
def test_appending_with_other_inputs_is_refused(built, dataset, change, named):  # noqa: F811
    cache = built[0]
    change = dict(change)
    if change.get("data.manifest") == "val":
        change["data.manifest"] = str(dataset["val"])
    before = read_all(cache)
    if "teacher_cache.teachers" in change:
        change["teacher_cache.input_sizes"] = [INPUT_SIZES[0]]
    with pytest.raises(CacheError, match="refusing to add") as err:
        run(config(dataset["train"], cache).replace(**change))
    message = str(err.value)
    assert all(part in message for part in named), message
    assert message.count("cache has") == 1  # only the difference is named
    after = read_all(cache)
    assert all(np.array_equal(before[n], after[n]) for n in before)


def test_teacher_weights_from_files_are_used(dataset, tmp_path):  # noqa: F811
    torch.manual_seed(123)  # not the run's init seed: the cache must differ from random init
    resnet = timm.create_model("test_resnet", num_classes=3)
    effnet = timm.create_model("test_efficientnet", num_classes=3)
    files = {"test_resnet": tmp_path / "resnet.pt", "test_efficientnet": tmp_path / "effnet.safetensors"}
    torch.save(resnet.state_dict(), files["test_resnet"])
    save_file({k: v.contiguous() for k, v in effnet.state_dict().items()}, files["test_efficientnet"])

    cache = tmp_path / "cache"
    run(config(dataset["train"], cache,
               **{"teacher_cache.teacher_weights": [f"{n}={p}" for n, p in files.items()]}))
    attrs = CacheReader(cache).attrs
    assert [t["weights"] for t in attrs["teachers"]] == ["file", "file"]
    assert all(len(t["weights_sha256"]) == 64 for t in attrs["teachers"])
    assert attrs["teacher_files"] == {n: str(p) for n, p in files.items()}
    assert_targets_match(cache, dataset["train"], seeded_teachers(3, weights=files))


def test_weights_for_another_class_count_are_refused(dataset, tmp_path):  # noqa: F811
    path = tmp_path / "five.pt"
    torch.save(timm.create_model("test_resnet", num_classes=5).state_dict(), path)
    cfg = config(dataset["train"], tmp_path / "cache", **{"teacher_cache.teacher_weights": [f"test_resnet={path}"]})
    with pytest.raises(WeightsError, match="3 classes"):
        run(cfg)


def test_pretrained_imagenet_teachers_need_1000_classes(dataset, tmp_path):  # noqa: F811
    with pytest.raises(WeightsError, match="1000 ImageNet classes but the manifest has 3"):
        run(config(dataset["train"], tmp_path / "cache", **{"teacher_cache.pretrained": True}))


def test_teacher_near_chance_stops_the_run(dataset, tmp_path, capsys):  # noqa: F811
    cache = tmp_path / "cache"
    cfg = config(dataset["train"], cache, **{"teacher_cache.evaluate_manifest": str(dataset["val"])})
    with pytest.raises(TeacherCheckError, match=r"test_resnet \(top-1.*wrong weights.*normalisation.*class order"):
        run(cfg)
    assert "ensemble (mean softmax)" in capsys.readouterr().out
    assert not cache.exists()  # checked before anything is written


def test_evaluation_is_recorded_and_does_not_block_resume(built, dataset, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    shutil.copytree(built[0], cache)
    cfg = config(dataset["train"], cache, **{"teacher_cache.evaluate_manifest": str(dataset["val"]),
                                            "teacher_cache.min_top1_over_chance": 0.0})
    summary = run(cfg)
    assert summary["shards_written"] == 0
    ev = CacheReader(cache).attrs["teacher_eval"]
    assert set(ev["teachers"]) == set(TEACHERS) and ev["manifest"]["num_images"] == 6
    assert all(0 <= r["top1"] <= r["top5"] <= 100 for r in [*ev["teachers"].values(), ev["ensemble"]])
    assert ev["chance_top1"] == pytest.approx(100 / 3)
    # two teachers: the ensemble without one is the other alone (docs/teachers.md)
    a, b = TEACHERS
    assert ev["leave_one_out"] == {a: ev["teachers"][b], b: ev["teachers"][a]}
    assert ev["best_teacher"]["top1"] == max(r["top1"] for r in ev["teachers"].values())


def test_evaluation_manifest_with_other_classes_is_refused(dataset, tmp_path):  # noqa: F811
    other = make_manifest(tmp_path, "two-classes", sizes=[(30, 30), (31, 31)], seed=5)  # classes ant, bee
    cfg = config(dataset["train"], tmp_path / "cache", **{"teacher_cache.evaluate_manifest": str(other)})
    with pytest.raises(ValueError, match="same classes in the same order"):
        run(cfg)


def test_auto_loader_renders_with_torch_on_cpu(dataset):  # noqa: F811
    from common.config import RuntimeConfig
    from common.runtime import build_runtime
    from stage1_teacher_cache.views import make_renderer

    runtime = build_runtime(RuntimeConfig(device="cpu"))
    pres = [seeded_teachers(3)[n][1] for n in TEACHERS]
    m = load_manifest(dataset["train"])
    for loader in ("torch", "auto"):
        views = make_renderer(loader, runtime, pres, 3, 2)([m.abspath(0)], [np.array([[[0, 0, 8, 8]] * 3])] * 2,
                                                          np.zeros((1, 3), np.uint8))
        assert [tuple(v.shape) for v in views] == [(3, 3, 32, 32), (3, 3, 40, 40)]


def test_reused_crops_outside_their_images_are_refused_naming_the_cache():
    from types import SimpleNamespace

    from stage1_teacher_cache.run import check_boxes_fit

    manifest = SimpleNamespace(widths=np.array([9, 20, 30]), heights=np.array([9, 10, 40]))
    boxes = np.array([[[0, 0, 20, 10], [5, 0, 15, 10]], [[0, 0, 30, 40], [1, 0, 29, 40]]], np.int32)  # images 1, 2
    flips = np.zeros((2, 2), np.uint8)
    check_boxes_fit(boxes, flips, manifest, 1, "other-cache")  # every box fits, edges included
    boxes[1, 1] = [1, 1, 29, 40]  # one row past the bottom of image 2
    with pytest.raises(CacheError, match=r"^other-cache: crop 1 of image 2: box \[1, 1, 29, 40\] flip 0 is not "
                                         r"inside the 30x40 image; that cache's crops cannot be reused$"):
        check_boxes_fit(boxes, flips, manifest, 1, "other-cache")


@pytest.mark.skipif(not dali_available(), reason="nvidia-dali not installed")
def test_dali_loader_gives_the_torch_loader_targets(built, dataset, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    run(config(dataset["train"], cache, **{"teacher_cache.loader": "dali"}))
    dali, torch_path = read_all(cache), read_all(built[0])
    for name in ("boxes", "flip", "topk_index"):
        assert np.array_equal(dali[name], torch_path[name]), name
    np.testing.assert_allclose(dali["topk_prob"].astype(np.float32), torch_path["topk_prob"].astype(np.float32),
                               atol=5e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
@pytest.mark.parametrize("precision, atol", [("fp32", 1e-2), ("bf16", 3e-2)])
@pytest.mark.parametrize("loader", ["torch", pytest.param("dali", marks=pytest.mark.skipif(
    not dali_available(), reason="nvidia-dali not installed"))])
def test_cuda_run_gives_the_cpu_targets(built, dataset, tmp_path, loader, precision, atol):  # noqa: F811
    """Stage 1 on the GPU (TF32 matmuls in fp32; bf16 autocast) caches the CPU run's crops and, within
    rounding, its targets. Dense targets are compared, not top-k indices: random-init teachers give
    near-uniform probabilities whose order rounding may swap."""
    cache = tmp_path / "cache"
    run(config(dataset["train"], cache, **{"runtime.device": "cuda", "runtime.precision": precision,
                                           "teacher_cache.loader": loader}))
    gpu, cpu = read_all(cache), read_all(built[0])
    for name in ("boxes", "flip"):
        assert np.array_equal(gpu[name], cpu[name]), name
    classes = CacheReader(cache).num_classes
    dense = [restore_targets(a["topk_index"], a["topk_prob"], classes) for a in (gpu, cpu)]
    torch.testing.assert_close(dense[0], dense[1], atol=atol, rtol=0)
    assert verify_cache(cache) == []
    assert CacheReader(cache).attrs["compute"]["device"].startswith("cuda")


def test_cli_builds_then_reports_and_verifies(dataset, tmp_path):  # noqa: F811
    from stage2_student_distill.app.cli import main

    cache = tmp_path / "cache"
    args = ["--set", "runtime.progress=false", "--set", "runtime.device=cpu", "teacher-cache",
            "--teachers", ",".join(TEACHERS), "--manifest", str(dataset["train"]), "--out", str(cache),
            "--topk", "2", "--temperature", "2.0", "--batch-size", "7", "--images-per-shard", "4",
            "--num-crops", "2", "--crop-seed", "9", "--loader", "torch", "--no-pretrained"]
    for size in INPUT_SIZES:
        args += ["--input-size", size]
    runner = CliRunner()
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "crops/s" in result.output and "B/crop" in result.output
    attrs = CacheReader(cache).attrs
    assert attrs["crops"]["seed"] == 9 and attrs["crops"]["num_crops"] == 2
    assert attrs["ensemble"]["temperature"] == 2.0 and attrs["config"]["teacher_cache"]["batch_size"] == 7

    info = runner.invoke(main, ["cache", "info", str(cache)])
    assert info.exit_code == 0, info.output
    assert "3/3 shards" in info.output and "test_efficientnet" in info.output and "40 px bicubic" in info.output
    as_json = json.loads(runner.invoke(main, ["cache", "info", str(cache), "--json"]).output)
    assert as_json["shards"] == {"complete": 3, "total": 3, "incomplete": []}

    ok = runner.invoke(main, ["cache", "verify", str(cache), "--manifest", str(dataset["train"])])
    assert ok.exit_code == 0 and ok.output.startswith("OK:"), ok.output
    wrong = runner.invoke(main, ["cache", "verify", str(cache), "--manifest", str(dataset["val"])])
    assert wrong.exit_code == 1 and "manifest" in wrong.output

    # second invocation of the same command: resumes, nothing to do; a changed seed is refused
    again = runner.invoke(main, args)
    assert again.exit_code == 0 and "wrote 0 shard(s)" in again.output
    refused = runner.invoke(main, [*args, "--crop-seed", "10"])
    assert refused.exit_code == 1 and "refusing to add" in refused.output and "'seed': 10" in refused.output
