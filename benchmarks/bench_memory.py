"""Host memory of `pipeline distill` against dataset size: 10k, 100k and 1.28M (ImageNet-1k) images.

Method, targets and sizing: docs/benchmarks.md, section bench_memory.

    python -m benchmarks.bench_memory              # 10k, 100k, 1.28M (3-4 min on 2 busy CPU cores, < 100 MB disk)
    python -m benchmarks.bench_memory --quick      # 10k, 50k, few steps (< 60 s)
    python -m benchmarks.bench_memory --sizes 10000,1281167 --steps 200
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path


from benchmarks.harness import (
    IMAGENET_TRAIN_IMAGES, LimitedLoader, Timer, announce, child_args, disk_usage, finish, ints, make_image_tree,
    markdown_table, module_command, perf_parser, resolve_preset, rss_bytes, run_child, synthetic_cache,
    synthetic_manifest, workdir,
)

WIDTH, HEIGHT = 400, 300
VAL_IMAGES = 10_000
MB = 2**20


def child(args) -> None:
    """One measurement, in a fresh process: JSON on the last stdout line."""
    phases = {"start": rss_bytes()}
    import dataclasses

    import torch  # noqa: F401

    from benchmarks.harness import timed_epoch
    from common.config import load_config
    from stage2_student_distill.checkpoint import unwrap
    from stage2_student_distill.train import setup, train_one_epoch  # noqa: F401

    phases["imports"] = rss_bytes()
    p = resolve_preset(args)
    cfg = load_config(None, {
        **p.runtime_keys(args.seed),
        "data.manifest": args.manifest, "data.val_manifest": args.val_manifest,
        "optim.epochs": 1, "optim.batch_size": p.stage2_batch, "optim.eval_batch_size": p.stage2_batch,
        "optim.img_size": p.student_size, "optim.loader": args.loader,
        "distill.student": p.student, "distill.cache": args.cache, "distill.out": args.run_dir,
    })
    with Timer() as assembly:
        job = setup(cfg, "distill")
    phases["job_assembled"] = rss_bytes()
    params = sum(x.numel() * x.element_size() for model in (job.student, job.discriminator) if model is not None
                 for x in unwrap(model).parameters())
    first = {}

    class Probe(LimitedLoader):  # records RSS once the first batch (epoch plan + gather done) arrives
        def epoch(self, e):
            t = time.perf_counter()
            for i, batch in enumerate(super().epoch(e)):
                if i == 0:
                    first["s"] = time.perf_counter() - t
                    phases["first_batch"] = rss_bytes()
                yield batch

    probe_job = dataclasses.replace(job, train_loader=Probe(job.train_loader, len(job.train_loader)))
    res = timed_epoch(probe_job, 0, warmup=min(2, args.steps - 1), max_steps=args.steps)
    phases["end"] = rss_bytes()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    manifest = job.train_loader.manifest
    index_bytes = {
        "manifest_paths_list": sys.getsizeof(manifest.paths) + sum(sys.getsizeof(s) for s in manifest.paths),
        "manifest_arrays": sum(a.nbytes for a in (manifest.image_ids, manifest.labels, manifest.widths,
                                                  manifest.heights, manifest.file_bytes)),
    }
    print(json.dumps({
        "images": manifest.num_images, "phases": phases, "ru_maxrss": usage.ru_maxrss * 1024,
        "param_bytes": params, "model_state_bytes": 3 * params,  # weights + grads + momentum (SGD)
        "assemble_s": assembly.seconds, "first_batch_s": first.get("s"), "img_per_s": res["img_per_s"],
        "steps": res["steps"], "index_bytes": index_bytes, "loader": job.train_loader.kind,
    }))


def child_manifest(args) -> None:
    """load_manifest alone in a fresh process: its transient peak and what it keeps."""
    from common.manifest import load_manifest

    before = rss_bytes()
    with Timer() as t:
        m = load_manifest(args.manifest)
    after = rss_bytes()
    print(json.dumps({"images": m.num_images, "before": before, "after": after, "seconds": t.seconds}))


def prepare(wd: Path, n: int, p, steps: int, seed: int, sources: list[Path]) -> dict:
    """Manifest, cache and the hard-linked image files the first ``steps`` batches need."""
    from stage2_student_distill.plan import plan_epoch

    d = wd / f"n{n}"
    d.mkdir(parents=True, exist_ok=True)
    root = d / "images"
    with Timer() as t_manifest:
        manifest = synthetic_manifest(d / "train.parquet", n, p.num_classes, root, WIDTH, HEIGHT)
    with Timer() as t_cache:
        synthetic_cache(d / "cache", manifest, 4, 5, 1024, seed=seed, workers=2 if n > 200_000 else 1)
    with Timer() as t_links:
        plan = plan_epoch(n, seed=seed, epoch=0, rank=0, world_size=1, images_per_batch=p.stage2_batch, shuffle=True)
        needed = plan.image_ids[: (steps + 6) * p.stage2_batch]  # + batches the prefetch thread renders ahead
        for i in needed:
            path = root / manifest.paths_fmt.format(int(i) % p.num_classes, int(i))
            path.parent.mkdir(parents=True, exist_ok=True)
            os.link(sources[int(i) % len(sources)], path)
    return {"manifest": manifest.path, "cache": d / "cache", "run_dir": d / "run", "manifest_s": t_manifest.seconds,
            "cache_s": t_cache.seconds, "links_s": t_links.seconds,
            "cache_bytes": disk_usage(d / "cache")["allocated"]}


def main(argv=None) -> int:
    parser = perf_parser(__doc__)
    parser.add_argument("--sizes", type=ints, default=None, help="comma list of dataset sizes (default 10000,100000,1281167)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per size (default: cpu 20, gpu 200)")
    parser.add_argument("--loader", default="auto", help="optim.loader: auto | dali | torch")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-manifest", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--val-manifest", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_manifest:
        child_manifest(args)
        return 0
    if args.child:
        child(args)
        return 0

    p = resolve_preset(args)
    sizes = args.sizes or ([10_000, 50_000] if args.quick else [10_000, 100_000, IMAGENET_TRAIN_IMAGES])
    steps = args.steps or (8 if args.quick else (200 if p.name == "gpu" else 20))
    info = announce(
        f"preset {p.name}: student {p.student} @ {p.student_size} px, batch {p.stage2_batch}, {steps} steps "
        f"per size, cache C=4 k=5, sizes {sizes}, loader {args.loader}")

    rows, raw = [], []
    with workdir(args, "bench-memory-") as wd:
        from PIL import Image

        src_root = make_image_tree(wd / "sources", 8, 1, sizes=(HEIGHT, HEIGHT), seed=args.seed, workers=1)
        sources = sorted(src_root.rglob("*.jpg"))
        for f in sources:  # exactly WIDTH x HEIGHT
            Image.open(f).convert("RGB").resize((WIDTH, HEIGHT)).save(f, "JPEG", quality=90)
        val = synthetic_manifest(wd / "val.parquet", VAL_IMAGES, p.num_classes, wd / "val-images", WIDTH, HEIGHT).path
        for n in sizes:
            prep = prepare(wd, n, p, steps, args.seed, sources)
            proc, child_s, load = run_child(module_command(
                "benchmarks.bench_memory", "--child", *child_args(args, p), "--manifest", str(prep["manifest"]),
                "--val-manifest", str(val), "--cache", str(prep["cache"]), "--run-dir", str(prep["run_dir"]),
                "--steps", str(steps), "--loader", args.loader), f"child for {n} images")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            m, _, _ = run_child(module_command("benchmarks.bench_memory", "--child-manifest", "--manifest",
                                               str(prep["manifest"])), f"load_manifest child for {n} images")
            r["manifest_load"] = ml = json.loads(m.stdout.strip().splitlines()[-1])
            ph = r["phases"]
            row = {
                "images": n,
                "peak_rss_mb": ph["end"]["VmHWM"] / MB,
                **{f"peak_by_{phase}_mb": ph[phase]["VmHWM"] / MB for phase in ("job_assembled", "first_batch")},
                "after_imports_mb": ph["imports"]["VmRSS"] / MB,
                **{f"{phase}_mb": ph[phase]["VmRSS"] / MB for phase in ("job_assembled", "first_batch", "end")},
                "model_state_mb": r["model_state_bytes"] / MB,
                "paths_list_mb": r["index_bytes"]["manifest_paths_list"] / MB,
                "manifest_load_kept_mb": (ml["after"]["VmRSS"] - ml["before"]["VmRSS"]) / MB,
                "manifest_load_transient_mb": (ml["after"]["VmHWM"] - ml["after"]["VmRSS"]) / MB,
                "first_batch_s": r["first_batch_s"],
                "img_per_s": r["img_per_s"],
                "cache_mb_on_disk": prep["cache_bytes"] / MB,
                "write_s": prep["manifest_s"] + prep["cache_s"],
                "child_s": child_s,
                "load1": load,
            }
            rows.append(row)
            raw.append({**r, "prepare": prep})
            print(f"  {n:>9,} images: peak RSS {row['peak_rss_mb']:.0f} MB (job assembled {row['job_assembled_mb']:.0f}, "
                  f"after first batch {row['first_batch_mb']:.0f}, end {row['end_mb']:.0f}); epoch start-up "
                  f"{row['first_batch_s']:.1f} s; data written in {row['write_s']:.1f} s; child {child_s:.0f} s "
                  f"(load {load})", flush=True)
            shutil.rmtree(wd / f"n{n}", ignore_errors=True)  # keep the disk small

    base = rows[0]
    for r in rows:
        r["growth_mb"] = r["peak_rss_mb"] - base["peak_rss_mb"]
    slope = None
    if len(rows) >= 2 and rows[-1]["images"] != base["images"]:
        slope = (rows[-1]["peak_rss_mb"] - base["peak_rss_mb"]) * MB / (rows[-1]["images"] - base["images"])
    imagenet_peak = base["peak_rss_mb"] + (slope or 0) * (IMAGENET_TRAIN_IMAGES - base["images"]) / MB
    # C=4, k=5 -> C=10, k=10: the per-epoch gathered rows (boxes 16 B + flip 1 + k*(2+2) B per used crop, m=1)
    # grow by 20 B per image; the crop permutation keys (C float64 + C int64 per image) by 96 B.
    peak_c10_k10 = imagenet_peak + (20 + 16 * (10 - 4)) * IMAGENET_TRAIN_IMAGES / MB
    limit = 4096 + base["model_state_mb"]
    verdict = {"bytes_per_image": slope, "imagenet_peak_mb": imagenet_peak, "imagenet_peak_mb_c10_k10": peak_c10_k10,
               "limit_mb": limit, "met": peak_c10_k10 <= limit}
    table = markdown_table(rows, [("images", "images"), ("peak_rss_mb", "peak RSS MB"), ("growth_mb", "growth vs smallest MB"),
                                  ("after_imports_mb", "after imports MB"),
                                  ("peak_by_job_assembled_mb", "peak by end of Job assembly MB"),
                                  ("job_assembled_mb", "RSS after Job built MB"), ("first_batch_mb", "after 1st batch MB"),
                                  ("end_mb", "at end MB"), ("paths_list_mb", "manifest paths list MB"),
                                  ("manifest_load_kept_mb", "load_manifest alone: kept MB"),
                                  ("manifest_load_transient_mb", "load_manifest alone: transient MB"),
                                  ("first_batch_s", "epoch start-up s"), ("cache_mb_on_disk", "cache on disk MB"),
                                  ("load1", "load avg")])
    print("\n" + table)
    print(f"\npeak RSS grows {slope or 0:.0f} bytes per image; ImageNet-1k (C=4, k=5): {imagenet_peak:.0f} MB, with C=10, "
          f"k=10 about {verdict['imagenet_peak_mb_c10_k10']:.0f} MB; limit 4 GB + model state "
          f"({base['model_state_mb']:.0f} MB) = {verdict['limit_mb']:.0f} MB -> {'met' if verdict['met'] else 'NOT met'}")
    finish("memory", args, info, {"preset": p, "steps": steps, "sizes": sizes, "cache": {
        "num_crops": 4, "topk": 5, "images_per_shard": 1024}, "rows": rows, "verdict": verdict, "raw": raw, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
