"""Every recipe runs: each recipe's real teachers and student, random weights, on a CPU.

Method, targets and sizing: docs/benchmarks.md, section bench_recipes.

    python -m benchmarks.bench_recipes                       # all recipes (a few minutes on 2 cores)
    python -m benchmarks.bench_recipes --recipes mealv2_resnet50_224 --size 32
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import traceback
from pathlib import Path


from benchmarks.harness import (
    begin, fmt_num, make_image_tree, markdown_table, run_header, write_results,
)


def smoke_overrides(cfg, size: int, manifest: Path, work: Path) -> dict:
    """The recipe, shrunk to a CPU smoke run; everything not named here is the recipe's."""
    multi = cfg.distill.crops_per_image  # FKD: keep its 8 crops per decoded image
    return {
        "runtime.device": "cpu",
        "runtime.progress": False,
        "runtime.num_workers": 1,
        "data.manifest": str(manifest),
        "data.val_manifest": str(manifest),
        "crops.num_crops": multi,
        "teacher_cache.pretrained": False,
        "teacher_cache.input_sizes": [f"{t}={size}" for t in cfg.teacher_cache.teachers],
        "teacher_cache.out": str(work / "cache"),
        "teacher_cache.batch_size": 8,
        "teacher_cache.images_per_shard": 4,
        "teacher_cache.loader": "torch",
        "optim.epochs": 1,
        "optim.batch_size": 2 * multi,  # 2 steps over 4 images
        "optim.eval_batch_size": 4,
        "optim.img_size": size,
        "optim.loader": "torch",
        "optim.log_every": 1,
        "distill.pretrained": False,
        "distill.cache": str(work / "cache"),
        "distill.out": str(work / "run"),
    }


def run_recipe(name: str, size: int, manifest: Path, workdir: Path) -> dict:
    from common.config import load_config
    from stage1_teacher_cache.run import run as teacher_cache
    from stage2_student_distill.experiment import timed
    from stage2_student_distill.train import run_distill

    work = workdir / name
    row: dict = {"recipe": name}
    try:
        recipe_cfg = load_config(recipe=name)
        cfg = load_config(recipe=name, overrides=smoke_overrides(recipe_cfg, size, manifest, work))
        row.update(teachers=", ".join(cfg.teacher_cache.teachers), student=cfg.distill.student,
                   crops_per_image=cfg.distill.crops_per_image)
        _, row["teacher_cache_s"], _ = timed(teacher_cache, cfg)
        result, row["distill_s"], _ = timed(run_distill, cfg)
        last = result["last"]
        row.update(outcome="ok", train_loss=last["train_loss"], val_top1=last["val_top1"], lr=last["lr"],
                   disc_lr=last.get("disc_lr"))
    except Exception as e:  # noqa: BLE001 - one recipe failing is the result to record
        row.update(outcome=f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        traceback.print_exc()
    print(f"{name}: {row['outcome']}", flush=True)
    return row


def main() -> None:
    from common.recipes import recipe_names

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="", help="comma-separated names (default: all)")
    parser.add_argument("--size", type=int, default=64, help="input size of every model (px)")
    parser.add_argument("--workdir", default="", help="default: a temporary directory, removed at the end")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/recipes.json)")
    args = parser.parse_args()
    names = [n for n in args.recipes.split(",") if n] or recipe_names()

    with tempfile.TemporaryDirectory(prefix="bench-recipes-") as tmp:
        started, info, workdir = begin(args.workdir or tmp)
        from data_manifests.build import build_manifest

        manifest = workdir / "images.parquet"
        build_manifest(make_image_tree(workdir / "images", 4, 2, sizes=(80, 120), workers=1), manifest,
                       progress=False)
        rows = []
        for name in names:  # the JSON is rewritten after each recipe: a stopped run keeps what it did
            rows.append(run_recipe(name, args.size, manifest, workdir))
            path = write_results("recipes", {**run_header(args, started, info), "rows": rows}, args.out)
    columns = [("recipe", "recipe"), ("teachers", "teachers"), ("student", "student"),
               ("crops_per_image", "m"), ("teacher_cache_s", "teacher-cache s"), ("distill_s", "distill s"),
               ("train_loss", "train loss"), ("outcome", "outcome")]
    print(markdown_table([{k: fmt_num(v, 2) if isinstance(v, float) else v for k, v in r.items()} for r in rows],
                         columns))
    print(f"wrote {path}")
    if any(r["outcome"] != "ok" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
