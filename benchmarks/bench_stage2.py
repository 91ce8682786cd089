"""Stage 2 throughput: `pipeline distill` against its compute limit, hard-label training and online MEAL V2.

Method, targets and sizing: docs/benchmarks.md, section bench_stage2.

    python -m benchmarks.bench_stage2               # full (~2.5 min on 2 busy CPU cores)
    python -m benchmarks.bench_stage2 --quick       # smoke run (< 60 s)
    python -m benchmarks.bench_stage2 --preset gpu                # on a CUDA machine (the default there)
"""
from __future__ import annotations

import dataclasses
import gc
import sys
import time
from pathlib import Path


import numpy as np
import torch

from benchmarks.harness import (
    LimitedLoader, Timer, announce, count_cuda_syncs, finish, image_dataset, loadavg, markdown_table, median_of,
    names, perf_parser, profile_table, profile_top, resolve_preset, subset_manifest, sync, synthetic_cache,
    timed_epoch, workdir,
)
from common.cache_storage import restore_targets
from common.config import load_config
from common.render import decode, normalize, render_crops
from stage2_student_distill.loaders import Batch, dali_available
from stage2_student_distill.train import setup, train_one_epoch


def config(p, wd: Path, manifest: Path, val: Path, cache: Path, loader: str, tag: str, seed: int):
    return load_config(None, {
        **p.runtime_keys(seed),
        "data.manifest": str(manifest),
        "data.val_manifest": str(val),
        "crops.num_crops": p.num_crops,
        "optim.epochs": 1,
        "optim.batch_size": p.stage2_batch,
        "optim.eval_batch_size": p.stage2_batch,
        "optim.img_size": p.student_size,
        "optim.loader": loader,
        "distill.student": p.student,
        "distill.cache": str(cache),
        "distill.out": str(wd / "runs" / f"distill-{tag}"),
        "train.model": p.student,
        "train.out": str(wd / "runs" / f"train-{tag}"),
        "teacher_cache.teachers": list(p.teachers),
        "teacher_cache.input_sizes": list(p.teacher_sizes),
        "teacher_cache.pretrained": False,
    })


# --------------------------------------------------------------------------- loaders of the comparison rows


class SyntheticLoader:
    """Batches already on the device, shaped like the distill loader's (the compute limit); with
    ``teachers``, also a uint8 view per teacher (for an online Job's target source to score)."""

    def __init__(self, real, steps: int, teachers=None):
        rt, pp = real.runtime, real.preprocess
        B, S, K = real.batch_size, pp.input_size, real.manifest.num_classes
        g = torch.Generator().manual_seed(0)
        pixels = torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8, generator=g)
        self.images = normalize(pixels, pp.mean, pp.std, rt.device, rt.memory_format())
        k = min(10, K)
        index = (torch.randint(0, K, (B, 1), generator=g) + torch.arange(k)) % K
        prob = torch.full((B, k), 0.9 / k, dtype=torch.float16)
        self.targets = restore_targets(index.numpy(), prob.numpy(), K, rt.device)
        self.labels = torch.randint(0, K, (B,), generator=g).to(rt.device)
        self.ids = torch.arange(B)
        # online compute limit: uint8 views per teacher, already on the device
        self.views = [torch.randint(0, 256, (B, 3, t.preprocess.input_size, t.preprocess.input_size),
                                    dtype=torch.uint8, generator=g).to(rt.device) for t in teachers] if teachers else None
        self.steps, self.batch_size, self.num_samples_per_epoch = steps, B, steps * B

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int):
        for _ in range(self.steps):
            yield Batch(self.images, self.ids, self.ids, self.ids, self.labels, self.targets, views=self.views)


def loader_only(loader, warmup: int, device) -> dict:
    """Iterating the loader without training (device normalisation + target restore included)."""
    n = 0
    load = loadavg()[0]
    for i, batch in enumerate(loader.epoch(0)):
        if i == warmup:
            sync(device)
            t0, cpu0 = time.perf_counter(), time.process_time()
        if i >= warmup:
            n += batch.images.shape[0]
    sync(device)
    return {"img_per_s": n / (time.perf_counter() - t0), "process_cpu_ms_per_img": 1000 * (time.process_time() - cpu0) / n,
            "load1": load}


# --------------------------------------------------------------------------- render anatomy (one thread)


def render_anatomy(manifest, cache_path: Path, size: int, interpolation: str, images: int) -> dict:
    """Single-threaded cost per image of the torch loader's steps (the library's ``decode`` and
    ``render_crops``), and of a PIL crop + resize alternative."""
    from PIL import Image

    from common.cache_format import CacheReader
    from common.images import open_image

    reader = CacheReader(cache_path)
    ids = np.arange(min(images, manifest.num_images))
    rows = reader.gather(ids, np.zeros_like(ids))
    t = {"decode": 0.0, "torch_render": 0.0, "pil_render": 0.0}
    pil_mode = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[interpolation]
    for j, i in enumerate(ids):
        path = manifest.abspath(int(i))
        t0 = time.perf_counter()
        image = decode(path)
        t1 = time.perf_counter()
        render_crops(image, rows["boxes"][j:j + 1], rows["flip"][j:j + 1], size, interpolation)
        t2 = time.perf_counter()
        x, y, w, h = (int(v) for v in rows["boxes"][j])
        out = open_image(path).resize((size, size), pil_mode, box=(x, y, x + w, y + h))
        if rows["flip"][j]:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        torch.from_numpy(np.array(out)).permute(2, 0, 1).contiguous()
        t3 = time.perf_counter()
        for key, dt in zip(t, (t1 - t0, t2 - t1, t3 - t2)):
            t[key] += dt
    return {**{f"{k}_ms": 1000 * v / len(ids) for k, v in t.items()}, "images": len(ids),
            "mean_file_kb": float(manifest.file_bytes[ids].mean() / 1024),
            "mean_pixels": float((manifest.widths[ids].astype(np.int64) * manifest.heights[ids]).mean())}


# --------------------------------------------------------------------------- main


def parse_args(argv):
    parser = perf_parser(__doc__)
    parser.add_argument("--images", type=int, default=None, help="training images (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None, help="steps excluded from the steady-state clock")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds over all rows (default 3, quick 1); "
                        "each row reports its median round")
    parser.add_argument("--loaders", type=names, default=None, help="comma list of stage 2 loaders to measure: dali,torch "
                        "(default: dali and torch on CPU, the auto choice on CUDA)")
    parser.add_argument("--online-steps", type=int, default=None, help="steps of the online rows (default: all; gpu: 40)")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile run and the render anatomy")
    args = parser.parse_args(argv)
    p = resolve_preset(args)
    quick_images = min(p.stage2_images, 6 * p.stage2_batch) if args.quick else None
    p = resolve_preset(args, stage2_images=args.images or quick_images, stage2_batch=args.batch_size or None)
    if p.device == "cpu" and torch.cuda.is_available():
        print("note: --preset cpu on a CUDA machine runs on the CPU", file=sys.stderr)
    on_gpu = torch.cuda.is_available() and p.device != "cpu"
    steps = p.stage2_images // p.stage2_batch
    args.warmup = args.warmup if args.warmup is not None else max(1, min(5, steps // 6))
    args.rounds = args.rounds or (1 if args.quick else 3)
    if not args.loaders:
        args.loaders = ["auto"] if on_gpu else (
            (["dali"] if dali_available() else []) + ([] if args.quick and dali_available() else ["torch"]))
    args.online_steps = args.online_steps or (min(steps, 40) if on_gpu else None)
    return args, p, on_gpu


def setup_data(args, p, wd: Path):
    """JPEGs + manifest, a validation subset and a synthetic cache (reused from a kept workdir)."""
    with Timer() as t_data:
        manifest_path, manifest = image_dataset(wd, f"train{p.stage2_images}", p.stage2_images, p.num_classes,
                                                sizes=p.image_sizes, seed=args.seed)
        val_path = subset_manifest(manifest, p.num_classes, wd / "val.parquet")
        cache = wd / f"cache{p.stage2_images}"
        if not cache.exists():
            synthetic_cache(cache, manifest, p.num_crops, p.topk, p.images_per_shard, seed=args.seed)
    print(f"data: {p.stage2_images} JPEGs ({manifest.file_bytes.mean() / 1024:.0f} KB mean, "
          f"{(manifest.widths.astype(float) * manifest.heights).mean() / 1e3:.0f} kpixel) + manifest + cache "
          f"in {t_data.seconds:.1f} s", flush=True)
    return manifest_path, manifest, val_path, cache


def setup_rows(args, p, wd, manifest_path, val_path, cache) -> tuple[list[dict], dict]:
    """Every row's job (mode, loader label, job, step cap), built once and measured in rounds; and the
    distill jobs by loader kind (for the loader-only rows)."""
    steps = p.stage2_images // p.stage2_batch
    stamp = iter(range(1000))

    def cfg_for(loader: str, tag: str):
        return config(p, wd, manifest_path, val_path, cache, loader, f"{tag}-{next(stamp)}", args.seed)

    def row(mode, label, job, max_steps=None):
        return {"mode": mode, "loader": label, "job": job, "max_steps": max_steps, "runs": []}

    first = args.loaders[0]
    base = setup(cfg_for(first, "limit"), "distill")
    rows = [row("compute limit", "-", dataclasses.replace(base, train_loader=SyntheticLoader(base.train_loader, steps)))]
    distill_jobs = {}
    for loader in args.loaders:
        job = setup(cfg_for(loader, "distill"), "distill")
        distill_jobs[job.train_loader.kind] = job
        rows.append(row("distill", job.train_loader.kind, job))
        if loader == first:
            job = setup(cfg_for(loader, "train"), "train")
            rows.append(row("train (hard labels)", job.train_loader.kind, job))
    online = setup(cfg_for(first, "online").replace(**{"distill.online": True, "distill.cache": ""}), "distill")
    rows.append(row("online MEAL V2", online.train_loader.kind, online, args.online_steps))
    rows.append(row("online compute limit", "-", dataclasses.replace(online, train_loader=SyntheticLoader(
        online.train_loader, args.online_steps or steps, teachers=online.targets.teachers))))
    return rows, distill_jobs


def measure_profiles(args, job, manifest, cache: Path, on_gpu: bool) -> dict:
    """Where the time goes: cProfile of the distill loop (main thread), render cost per image, CUDA syncs."""
    extra = {}
    if not args.quick:
        extra["profile_distill_main_thread"] = profile_top(lambda: timed_epoch(job, args.rounds, args.warmup))
        extra["profile_loader"] = job.train_loader.kind
    pp = job.train_loader.preprocess
    extra["render_anatomy"] = render_anatomy(manifest, cache, pp.input_size, pp.interpolation, 16 if args.quick else 64)
    if on_gpu:  # host<->device synchronisations per training step, and where they come from
        n = min(10, len(job.train_loader))
        syncs = count_cuda_syncs(lambda: train_one_epoch(
            dataclasses.replace(job, train_loader=LimitedLoader(job.train_loader, n)), args.rounds + 1))
        extra["cuda_syncs"] = {**syncs, "steps": n, "per_step": syncs["total"] / n}
    return extra


def measure(args, p, wd: Path, on_gpu: bool) -> tuple[list[dict], dict]:
    """Every row warmed once (allocator, autotuning, thread pools), then interleaved rounds: the table's rows
    (medians over the rounds) and the profiles."""
    manifest_path, manifest, val_path, cache = setup_data(args, p, wd)
    rows_spec, distill_jobs = setup_rows(args, p, wd, manifest_path, val_path, cache)
    for spec in rows_spec:
        timed_epoch(spec["job"], 0, warmup=0, max_steps=2)
    loader_runs = {kind: [] for kind in distill_jobs}
    for r in range(args.rounds):
        for spec in rows_spec:
            res = timed_epoch(spec["job"], r, args.warmup, spec["max_steps"])
            spec["runs"].append(res)
            print(f"  round {r + 1}: {spec['mode']:<22} {spec['loader']:<6} {res['img_per_s']:>8.1f} img/s, "
                  f"CPU ms/img: main thread {res['main_cpu_ms_per_img']:.2f}, process "
                  f"{res['process_cpu_ms_per_img']:.2f} (load {res['load1']})", flush=True)
        for kind, job in distill_jobs.items():
            res = loader_only(job.train_loader, args.warmup, job.runtime.device)
            loader_runs[kind].append(res)
            print(f"  round {r + 1}: loader only (distill)  {kind:<6} {res['img_per_s']:>8.1f} img/s, "
                  f"CPU ms/img: process {res['process_cpu_ms_per_img']:.2f} (load {res['load1']})", flush=True)
    keys = ("img_per_s", "epoch_img_per_s", "main_cpu_ms_per_img", "process_cpu_ms_per_img", "load1")
    rows = [{"mode": spec["mode"], "loader": spec["loader"], **{k: median_of(spec["runs"], k) for k in keys},
             "img_per_s_rounds": [x["img_per_s"] for x in spec["runs"]], "steps": spec["runs"][0]["steps"],
             "warmup_steps": args.warmup, "losses": spec["runs"][-1]["losses"]} for spec in rows_spec]
    rows += [{"mode": "loader only (distill)", "loader": kind, **{k: median_of(runs, k) for k in keys},
              "img_per_s_rounds": [x["img_per_s"] for x in runs]} for kind, runs in loader_runs.items()]
    extra = {} if args.no_profile else measure_profiles(args, next(iter(distill_jobs.values())), manifest, cache,
                                                        on_gpu)
    del rows_spec, distill_jobs
    gc.collect()
    return rows, extra


def summarize(rows: list[dict], on_gpu: bool) -> dict:
    """Each row against the compute limit and online MEAL V2 (added to the rows); the targets."""
    by_mode = {r["mode"]: r for r in rows}  # these three modes have one row each
    limit, online, online_limit = by_mode["compute limit"], by_mode["online MEAL V2"], by_mode["online compute limit"]
    for r in rows:
        r["x_compute_limit"] = r["img_per_s"] / limit["img_per_s"]
        r["x_online"] = r["img_per_s"] / online["img_per_s"]
        if r.get("main_cpu_ms_per_img"):
            r["x_compute_limit_cpu"] = limit["main_cpu_ms_per_img"] / r["main_cpu_ms_per_img"]
            r["x_online_cpu"] = online["main_cpu_ms_per_img"] / r["main_cpu_ms_per_img"]
    best = max((r for r in rows if r["mode"] == "distill"), key=lambda r: r["img_per_s"])
    return {
        "distill_loader": best["loader"],
        "distill_over_compute_limit": best["x_compute_limit"],
        "distill_over_online": best["x_online"],
        "distill_over_online_compute_limit": best["img_per_s"] / online_limit["img_per_s"],
        "cpu_time_ratios": {"distill_over_compute_limit": best.get("x_compute_limit_cpu"),
                            "distill_over_online": best.get("x_online_cpu")},
        # teachers' forward per image over the student's step per image (training-thread CPU time)
        "teacher_cost_over_student_step": online_limit["main_cpu_ms_per_img"] / limit["main_cpu_ms_per_img"] - 1,
        "target_compute_limit": 0.95,
        "target_online": 4.0,
        "met_compute_limit": best["x_compute_limit"] >= 0.95,
        "met_online": best["x_online"] >= 4.0,
        "judged_on": "gpu" if on_gpu else "cpu (the targets are GPU targets; not judged here)",
    }


def report(rows: list[dict], targets: dict, extra: dict) -> str:
    """Prints the table, the targets and the profiles; returns the table."""
    table = markdown_table(rows, [("mode", "mode"), ("loader", "loader"), ("img_per_s", "img/s (median)"),
                                  ("x_compute_limit", "x compute limit"), ("x_online", "x online"),
                                  ("main_cpu_ms_per_img", "train-thread CPU ms/img"),
                                  ("process_cpu_ms_per_img", "process CPU ms/img"),
                                  ("x_compute_limit_cpu", "x compute limit (train-thread CPU)"),
                                  ("x_online_cpu", "x online (train-thread CPU)"), ("load1", "load avg (1 min)")])
    print("\n" + table)
    t, cpu = targets, targets["cpu_time_ratios"]
    print(f"\ndistill ({t['distill_loader']}) / compute limit = {t['distill_over_compute_limit']:.2f} wall, "
          f"{cpu['distill_over_compute_limit'] or 0:.2f} by training-thread CPU (target >= 0.95); / online MEAL V2 = "
          f"{t['distill_over_online']:.2f} wall, {cpu['distill_over_online'] or 0:.2f} by CPU (target >= 4); "
          f"teachers' forward costs {t['teacher_cost_over_student_step']:.2f} x the student's step; judged on "
          f"{t['judged_on']}")
    if extra.get("profile_distill_main_thread"):
        print(profile_table(f"distill loop ({extra['profile_loader']} loader), main thread",
                            extra["profile_distill_main_thread"]))
    if extra.get("render_anatomy"):
        a = extra["render_anatomy"]
        print(f"\ntorch loader, one thread, per image ({a['images']} images, {a['mean_file_kb']:.0f} KB, "
              f"{a['mean_pixels'] / 1e3:.0f} kpixel): decode {a['decode_ms']:.2f} ms, torch crop+resize "
              f"{a['torch_render_ms']:.2f} ms; PIL crop+resize (with its own decode) {a['pil_render_ms']:.2f} ms")
    if extra.get("cuda_syncs"):
        c = extra["cuda_syncs"]
        print(f"\nCUDA synchronisations in {c['steps']} distill steps: {c['total']} ({c['per_step']:.1f} per step): {c['by_line']}")
    return table


def main(argv=None) -> int:
    args, p, on_gpu = parse_args(argv)
    info = announce(
        f"preset {p.name}: student {p.student} @ {p.student_size} px, batch {p.stage2_batch}, "
        f"{p.stage2_images} images ({p.stage2_images // p.stage2_batch} steps/epoch, {args.warmup} warm-up, "
        f"{args.rounds} round(s)), teachers {list(p.teachers)} {list(p.teacher_sizes)}, {p.num_classes} "
        f"classes, C={p.num_crops}, k={p.topk}, {p.num_workers} loader workers, loaders {args.loaders}")
    with workdir(args, "bench-stage2-") as wd:
        rows, extra = measure(args, p, wd, on_gpu)
    targets = summarize(rows, on_gpu)
    table = report(rows, targets, extra)
    finish("stage2", args, info, {"preset": p, "warmup_steps": args.warmup, "rounds": args.rounds, "rows": rows,
                                  "targets": targets, **extra, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
