"""Stage 1 throughput: `pipeline teacher-cache` (crops/s) against the ensemble's pure forward pass.

Method, targets and sizing: docs/benchmarks.md, section bench_stage1.

    python -m benchmarks.bench_stage1               # full (~2 min on 2 busy CPU cores)
    python -m benchmarks.bench_stage1 --quick       # smoke run (< 60 s)
    python -m benchmarks.bench_stage1 --preset gpu                # on a CUDA machine (the default there)
"""
from __future__ import annotations

import gc
import shutil
import sys
import time
from pathlib import Path

import torch

import stage1_teacher_cache.run as s1
from benchmarks.harness import (
    Timer, announce, count_cuda_syncs, finish, image_dataset, loadavg, markdown_table, median_of, perf_parser,
    profile_table, profile_top, resolve_preset, say, subset_manifest, sync, workdir,
)
from common.config import load_config
from common.runtime import build_runtime
from stage1_teacher_cache.ensemble import ensemble_topk, teacher_probs
from stage1_teacher_cache.teachers import load_teachers
from common.prefetch import prefetch
from stage1_teacher_cache.views import make_renderer


def config(p, manifest: Path, out: Path, seed: int, loader: str = "auto"):
    return load_config(None, {
        **p.runtime_keys(seed),
        "data.manifest": str(manifest),
        "crops.num_crops": p.num_crops,
        "teacher_cache.teachers": list(p.teachers),
        "teacher_cache.input_sizes": list(p.teacher_sizes),
        "teacher_cache.pretrained": False,
        "teacher_cache.out": str(out),
        "teacher_cache.topk": p.topk,
        "teacher_cache.batch_size": p.stage1_batch,
        "teacher_cache.images_per_shard": p.images_per_shard,
        "teacher_cache.loader": loader,
    })


def timed_run(cfg) -> dict:
    """run(cfg) and its timestamps at the end of every shard's forward passes (``shard_stamps``;
    the top-k's .numpy() has synced the device by then)."""
    load = loadavg()[0]
    with Timer() as t:
        summary = s1.run(cfg)
    stamps = summary["shard_stamps"]
    steady = main_cpu = proc_cpu = None
    if len(stamps) >= 2:
        n = sum(x[-1] for x in stamps[1:])
        steady = n / (stamps[-1][0] - stamps[0][0])
        main_cpu = 1000 * (stamps[-1][1] - stamps[0][1]) / n
        proc_cpu = 1000 * (stamps[-1][2] - stamps[0][2]) / n
    return {"crops_per_s": steady, "command_crops_per_s": summary["crops_per_s"], "crops": summary["crops"],
            "main_cpu_ms_per_crop": main_cpu, "process_cpu_ms_per_crop": proc_cpu,
            "shards": len(stamps), "wall_s": t.seconds, "load1": load}


def random_views(teachers, batch: int) -> list[torch.Tensor]:
    """A batch of random uint8 views per teacher, at its input size (seeded: every call draws the same)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (batch, 3, t.preprocess.input_size, t.preprocess.input_size), dtype=torch.uint8,
                          generator=g) for t in teachers]


def forward_limit(teachers, runtime, batch: int, batches: int, warmup: int = 2) -> dict:
    """teacher_probs + ensemble_topk on random uint8 views already on the device."""
    views = [v.to(runtime.device) for v in random_views(teachers, batch)]
    load = loadavg()[0]
    for i in range(warmup + batches):
        if i == warmup:
            sync(runtime.device)
            t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
        ensemble_topk(teacher_probs(teachers, views, runtime), 10)  # .cpu(): one sync per batch, as run() does
    sync(runtime.device)
    n = batch * batches
    return {"crops_per_s": n / (time.perf_counter() - t0), "main_cpu_ms_per_crop": 1000 * (time.thread_time() - c0) / n,
            "process_cpu_ms_per_crop": 1000 * (time.process_time() - p0) / n, "load1": load}


def render_jobs(cfg, manifest, group: int, limit_images: int | None = None):
    """The (paths, per-teacher boxes, flips) groups run() renders, shard by shard."""
    n = manifest.num_images if limit_images is None else min(limit_images, manifest.num_images)
    T = len(cfg.teacher_cache.teachers)
    b = s1.shard_boxes(cfg.crops, manifest, 0, n)
    xywh = b.as_array()
    for lo in range(0, n, group):
        rows = slice(lo, lo + group)
        yield [manifest.abspath(i) for i in range(lo, min(lo + group, n))], [xywh[rows]] * T, b.flip[rows]


def render_only(render, cfg, manifest, group: int, workers: int) -> dict:
    jobs = list(render_jobs(cfg, manifest, group))
    warm = max(1, len(jobs) // 8)
    load = loadavg()[0]
    crops = 0
    for i, views in enumerate(prefetch(lambda job: render(*job), jobs, workers, depth=2 * workers + 2)):
        if i == warm - 1:
            t0, p0 = time.perf_counter(), time.process_time()
        elif i >= warm:
            crops += len(views[0])
    return {"crops_per_s": crops / (time.perf_counter() - t0),
            "process_cpu_ms_per_crop": 1000 * (time.process_time() - p0) / crops, "load1": load}


def parse_args(argv):
    parser = perf_parser(__doc__)
    parser.add_argument("--images", type=int, default=None, help="images in the dataset (default: the preset's)")
    parser.add_argument("--batch-size", type=int, default=None, help="crops per teacher forward")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--loader", default="auto", help="teacher_cache.loader: auto | torch | dali")
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args(argv)
    p = resolve_preset(args)
    quick_images = min(p.stage1_images, 3 * p.images_per_shard) if args.quick else None
    p = resolve_preset(args, stage1_images=args.images or quick_images, stage1_batch=args.batch_size or None)
    return args, p, args.rounds or (1 if args.quick else 3)


def setup_data(args, p, wd: Path):
    """The JPEGs + manifest, a warm-up subset, and a warm-up run (page cache, allocator, cuDNN autotuning,
    DALI start-up) on it."""
    with Timer() as t_data:
        manifest_path, manifest = image_dataset(wd, f"s1-{p.stage1_images}", p.stage1_images,
                                                min(p.num_classes, p.stage1_images), sizes=p.image_sizes, seed=args.seed)
        warm_path = subset_manifest(manifest, min(manifest.num_images, 2 * p.images_per_shard), wd / "warm.parquet")
    say(f"data: {manifest.num_images} JPEGs ({manifest.file_bytes.mean() / 1024:.0f} KB mean, "
        f"{(manifest.widths.astype(float) * manifest.heights).mean() / 1e3:.0f} kpixel) + manifest in "
        f"{t_data.seconds:.1f} s")
    s1.run(config(p, warm_path, wd / "cache-warm", args.seed, args.loader))
    shutil.rmtree(wd / "cache-warm", ignore_errors=True)
    return manifest_path, manifest


def measure(args, p, rounds, wd: Path, on_gpu: bool) -> tuple[dict, str, int, dict]:
    """Interleaved rounds of the three measurements (the run, the forward limit, the renderer alone), then the
    profiles: (the rounds' measurements, the renderer's kind, the forward limit's batches, the profiles)."""
    manifest_path, manifest = setup_data(args, p, wd)
    cfg = config(p, manifest_path, wd / "cache-x", args.seed, args.loader)
    runtime = build_runtime(cfg.runtime)
    teachers = load_teachers(cfg.teacher_cache, manifest.num_classes, runtime, seed=args.seed)
    group = max(1, cfg.teacher_cache.batch_size // p.num_crops)
    render = make_renderer(cfg.teacher_cache.loader, runtime, [t.preprocess for t in teachers], p.num_crops, group)
    limit_batches = max(5, min(40, p.stage1_images * p.num_crops // p.stage1_batch // 3))
    runs = {"run": [], "limit": [], "render": []}
    for r in range(rounds):
        out = wd / f"cache-{r}"
        res = timed_run(config(p, manifest_path, out, args.seed, args.loader))
        shutil.rmtree(out, ignore_errors=True)
        runs["run"].append(res)
        say(f"  round {r + 1}: teacher-cache run     {res['crops_per_s'] or 0:>9.1f} crops/s steady, "
            f"{res['command_crops_per_s']:.1f} command figure (load {res['load1']})")
        res = forward_limit(teachers, runtime, p.stage1_batch, limit_batches)
        runs["limit"].append(res)
        say(f"  round {r + 1}: ensemble forward      {res['crops_per_s']:>9.1f} crops/s (load {res['load1']})")
        res = render_only(render, cfg, manifest, group, runtime.num_workers)
        runs["render"].append(res)
        say(f"  round {r + 1}: render only ({render.kind:<5})  {res['crops_per_s']:>9.1f} crops/s "
            f"(load {res['load1']})")
    extra = {}
    if not args.no_profile:  # where the time goes: cProfile of the run and of the renderer; CUDA syncs
        if not args.quick:
            out = wd / "cache-profile"
            extra["profile_run_main_thread"] = profile_top(
                lambda: s1.run(config(p, manifest_path, out, args.seed, args.loader)))
            shutil.rmtree(out, ignore_errors=True)
        jobs = list(render_jobs(cfg, manifest, group, limit_images=8 * group))
        extra["profile_render_one_thread"] = profile_top(lambda: [render(*job) for job in jobs])
        if on_gpu:  # host<->device synchronisations of one forward batch (as run() makes it)
            host = random_views(teachers, p.stage1_batch)
            dev = [v.to(runtime.device) for v in host]
            extra["cuda_syncs_per_batch"] = {
                "host_views (torch renderer)": count_cuda_syncs(
                    lambda: ensemble_topk(teacher_probs(teachers, host, runtime), p.topk)),
                "device_views (DALI renderer)": count_cuda_syncs(
                    lambda: ensemble_topk(teacher_probs(teachers, dev, runtime), p.topk)),
            }
    render_kind = render.kind
    del teachers, render
    gc.collect()
    return runs, render_kind, limit_batches, extra


def summarize(runs: dict, render_kind: str, workers: int, on_gpu: bool) -> tuple[list[dict], dict]:
    """The table's rows (medians over the rounds, x the forward limit) and the targets."""
    def row(label, key, rate_field="crops_per_s"):
        return {"row": label, "crops_per_s": median_of(runs[key], rate_field),
                **{k: median_of(runs[key], k) for k in ("load1", "main_cpu_ms_per_crop", "process_cpu_ms_per_crop")},
                "rounds": [x[rate_field] for x in runs[key]]}

    run_row, limit_row = row("teacher-cache run (steady)", "run"), row("ensemble forward on device tensors (limit)", "limit")
    render_row = row(f"render only ({render_kind}, {workers} workers)", "render")
    table_rows = [run_row, {**row("teacher-cache run (command's figure)", "run", "command_crops_per_s"),
                            "main_cpu_ms_per_crop": None, "process_cpu_ms_per_crop": None}, limit_row, render_row]
    limit = limit_row["crops_per_s"]
    for r in table_rows:
        r["x_limit"] = r["crops_per_s"] / limit if r["crops_per_s"] else None
    ratio = run_row["crops_per_s"] / limit
    # If rendering and forward shared nothing, the run would go at min(render, forward);
    # if they shared one set of cores fully, at the harmonic combination.
    targets = {"run_over_limit": ratio, "target": 0.9, "met": ratio >= 0.9,
               "overlapped_bound": min(limit, render_row["crops_per_s"]),
               "serial_bound": 1 / (1 / limit + 1 / render_row["crops_per_s"]),
               "run_process_cpu_ms_per_crop": run_row["process_cpu_ms_per_crop"],
               "parts_process_cpu_ms_per_crop": limit_row["process_cpu_ms_per_crop"]
               + render_row["process_cpu_ms_per_crop"],
               "run_main_cpu_over_forward_main_cpu": (run_row["main_cpu_ms_per_crop"] or 0)
               / limit_row["main_cpu_ms_per_crop"],
               "judged_on": "gpu" if on_gpu else "cpu (GPU target; not judged here)"}
    return table_rows, targets


def report(table_rows: list[dict], targets: dict, render_kind: str, extra: dict) -> str:
    """Prints the table, the targets and the profiles; returns the table."""
    table = markdown_table(table_rows, [("row", "what"), ("crops_per_s", "crops/s (median)"),
                                        ("x_limit", "x forward limit"), ("main_cpu_ms_per_crop", "main-thread CPU ms/crop"),
                                        ("process_cpu_ms_per_crop", "process CPU ms/crop"),
                                        ("load1", "load avg (1 min)")])
    print("\n" + table)
    t = targets
    print(f"\nrun / forward limit = {t['run_over_limit']:.2f} (target >= 0.9); bounds from the parts: overlapped "
          f"min(render, forward) = {t['overlapped_bound']:.1f}, serial 1/(1/render + 1/forward) = "
          f"{t['serial_bound']:.1f} crops/s. CPU per crop: run {t['run_process_cpu_ms_per_crop']:.2f} ms vs render + "
          f"forward {t['parts_process_cpu_ms_per_crop']:.2f} ms; the run's main thread spends "
          f"{t['run_main_cpu_over_forward_main_cpu']:.2f} x the forward's CPU per crop; judged on {t['judged_on']}")
    for key, title in (("profile_run_main_thread", "run(cfg), main thread"),
                       ("profile_render_one_thread", f"{render_kind} renderer called synchronously")):
        if key in extra:
            print(profile_table(title, extra[key]))
    if extra.get("cuda_syncs_per_batch"):
        print(f"\nCUDA synchronisations per forward batch: {extra['cuda_syncs_per_batch']}")
    return table


def main(argv=None) -> int:
    args, p, rounds = parse_args(argv)
    on_gpu = torch.cuda.is_available() and p.device != "cpu"
    info = announce(
        f"preset {p.name}: teachers {list(p.teachers)} {list(p.teacher_sizes)}, {p.stage1_images} images x "
        f"C={p.num_crops} = {p.stage1_images * p.num_crops} crops, batch {p.stage1_batch}, k={p.topk}, shards of "
        f"{p.images_per_shard}, {p.num_workers} render workers, loader {args.loader}, {rounds} round(s)")
    with workdir(args, "bench-stage1-") as wd:
        runs, render_kind, limit_batches, extra = measure(args, p, rounds, wd, on_gpu)
    table_rows, targets = summarize(runs, render_kind, p.num_workers, on_gpu)
    table = report(table_rows, targets, render_kind, extra)
    finish("stage1", args, info, {"preset": p, "rounds": rounds, "render": render_kind, "limit_batches": limit_batches,
                                  "rows": table_rows, "runs": runs, "targets": targets, **extra, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
