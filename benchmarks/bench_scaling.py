"""Scaling: stage 1 and stage 2 throughput with 1 and 2 ranks under torchrun.

Method, targets and sizing: docs/benchmarks.md, section bench_scaling.

    python -m benchmarks.bench_scaling            # full (~2.5 min on 2 busy CPU cores)
    python -m benchmarks.bench_scaling --quick    # smoke run: 2 ranks only (~1 min)
    python -m benchmarks.bench_scaling --preset gpu --worlds 1,2,4,8   # on a GPU node
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path


from benchmarks.harness import (
    Timer, announce, child_args, finish, image_dataset, ints, loadavg, markdown_table, median_of, perf_parser,
    resolve_preset, run_child, say, subset_manifest, synthetic_cache, workdir,
)


def worker(args) -> None:
    import torch

    from benchmarks.bench_stage1 import config as stage1_config, timed_run
    from benchmarks.bench_stage2 import SyntheticLoader, config as stage2_config
    from benchmarks.harness import timed_epoch
    from stage2_student_distill.train import setup

    p = resolve_preset(args, num_workers=1, images_per_shard=args.shard)  # stage 1's shards; stage 2 reads none
    torch.set_num_threads(1)
    wd = Path(args.workdir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    out = {"world_size": world, "loadavg_start": loadavg()}

    # stage 1
    from stage1_teacher_cache.run import run

    if not args.quick:  # warm-up: page cache, allocator, autotuning
        run(stage1_config(p, wd / "s1-warm.parquet", wd / f"w{world}-cache-warm", args.seed))
    res = timed_run(stage1_config(p, wd / "s1.parquet", wd / f"w{world}-cache", args.seed))
    steady = torch.tensor([res["crops_per_s"] or 0.0, (res["process_cpu_ms_per_crop"] or 0.0) / world],
                          dtype=torch.float64)
    if world > 1:
        torch.distributed.all_reduce(steady)
    out["stage1"] = {**res, "sum_steady_crops_per_s": float(steady[0]), "mean_cpu_ms_per_crop": float(steady[1])}

    # stage 2: bench_stage2's config (one loader worker per rank: the preset above) on this benchmark's data
    job = setup(stage2_config(p, wd, wd / "s2.parquet", wd / "s1-warm.parquet", wd / "s2-cache", args.loader,
                              f"w{world}", args.seed), "distill")
    steps = len(job.train_loader)
    synth = dataclasses.replace(job, train_loader=SyntheticLoader(job.train_loader, steps))
    timed_epoch(job, 0, warmup=0, max_steps=2)
    timed_epoch(synth, 0, warmup=0, max_steps=2)
    warmup = min(args.warmup, steps - 2)
    results = {"distill": [], "compute limit (DDP)": []}
    for r in range(args.rounds):
        for name, j in (("distill", job), ("compute limit (DDP)", synth)):
            res = timed_epoch(j, r + 1, warmup)
            seconds = res["timed_images"] / res["img_per_s"]
            t = torch.tensor([res["timed_images"], seconds, res["process_cpu_ms_per_img"] / world], dtype=torch.float64)
            if world > 1:
                torch.distributed.all_reduce(t[:1])
                torch.distributed.all_reduce(t[1:2], op=torch.distributed.ReduceOp.MAX)
                torch.distributed.all_reduce(t[2:])
            results[name].append({**res, "global_img_per_s": float(t[0] / t[1]), "mean_cpu_ms_per_img": float(t[2])})
    out.update(stage2=results, stage2_steps_per_rank=steps, loadavg_end=loadavg())
    if rank == 0:
        Path(args.result).write_text(json.dumps(out))


def parse_args(argv):
    parser = perf_parser(__doc__)
    parser.add_argument("--worlds", type=ints, default=None, help="comma list of rank counts (default 1,2; --quick: 2, a "
                        "smoke run of the machinery, since each torchrun launch pays ~20-30 s of imports here)")
    parser.add_argument("--loader", default="auto", help="optim.loader for stage 2: auto | dali | torch")
    parser.add_argument("--rounds", type=int, default=None, help="stage 2 repetitions per launch (default 2, quick 1)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--shard", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args, None
    p = resolve_preset(args)
    args.worlds = args.worlds or ([2] if args.quick else [1, 2])
    import torch

    if p.device != "cpu" and torch.cuda.is_available() and max(args.worlds) > torch.cuda.device_count():
        raise SystemExit(f"--worlds {args.worlds}: this machine has {torch.cuda.device_count()} GPU(s), one per rank; "
                         "lower --worlds or use --preset cpu")
    args.rounds = args.rounds or (1 if args.quick else 2)
    # per-rank work stays the same size as the preset's; the dataset is sized for the largest world
    args.s1_images = (64 if args.quick else 256) if p.name == "cpu" else p.stage1_images
    args.s2_images = (4 if args.quick else 16) * p.stage2_batch * max(args.worlds)
    args.shard = max(8, args.s1_images // (4 * max(args.worlds)))
    return args, p


def setup_data(args, p, wd: Path) -> None:
    """Stage 2's JPEGs, manifest and synthetic cache; stage 1's manifest (and its warm-up) a subset of them."""
    with Timer() as t:
        s2_path, s2 = image_dataset(wd, f"s2-{args.s2_images}", args.s2_images, min(p.num_classes, args.s2_images),
                                    sizes=p.image_sizes, seed=args.seed)
        shutil.copy(s2_path, wd / "s2.parquet")
        subset_manifest(s2, args.s1_images, wd / "s1.parquet")
        subset_manifest(s2, min(args.s1_images, 2 * args.shard), wd / "s1-warm.parquet")
        if not (wd / "s2-cache").exists():
            synthetic_cache(wd / "s2-cache", s2, p.num_crops, p.topk, p.images_per_shard, seed=args.seed)
    say(f"data in {t.seconds:.1f} s")


def launch(args, p, wd: Path, world: int) -> dict:
    """One torchrun launch of ``world`` ranks running :func:`worker`; rank 0's result."""
    result = wd / f"result-{world}.json"
    # torchrun's module, not its script: a venv made without console scripts has no bin/torchrun
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), "-m",
           "benchmarks.bench_scaling", "--worker", *child_args(args, p), "--workdir", str(wd), "--result", str(result),
           "--loader", args.loader, "--rounds", str(args.rounds), "--shard", str(args.shard)]
    if args.quick:
        cmd.append("--quick")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    _, launch_s, load = run_child(cmd, f"torchrun with {world} rank(s)", env=env)
    r = json.loads(result.read_text())
    r["launch_s"], r["load1"] = launch_s, load
    s2r = {k: max(x["global_img_per_s"] for x in v) for k, v in r["stage2"].items()}
    say(f"  {world} rank(s): stage 1 {r['stage1']['command_crops_per_s']:.1f} crops/s (command), "
        f"{r['stage1']['sum_steady_crops_per_s']:.1f} steady; stage 2 distill {s2r['distill']:.1f} img/s, "
        f"compute limit (DDP) {s2r['compute limit (DDP)']:.1f} img/s; launch {launch_s:.0f} s (load {load})")
    return r


def summarize(launches: list[dict]) -> list[dict]:
    """One row per stage and rank count (stage 2: the median round), with the speed-up over 1 rank."""
    rows = []
    for r in launches:
        w = r["world_size"]
        rows.append({"stage": "1: teacher-cache run (command figure)", "ranks": w,
                     "rate": r["stage1"]["command_crops_per_s"], "unit": "crops/s", "load1": r["load1"]})
        rows.append({"stage": "1: teacher-cache run (sum of ranks' steady rates)", "ranks": w,
                     "rate": r["stage1"]["sum_steady_crops_per_s"], "unit": "crops/s", "load1": r["load1"],
                     "cpu_ms": r["stage1"]["mean_cpu_ms_per_crop"]})
        for name, runs in r["stage2"].items():
            rows.append({"stage": f"2: {name}", "ranks": w, "rate": median_of(runs, "global_img_per_s"),
                         "unit": "img/s", "load1": r["load1"], "cpu_ms": median_of(runs, "mean_cpu_ms_per_img"),
                         "rounds": [x["global_img_per_s"] for x in runs]})
    rows.sort(key=lambda row: (row["stage"], row["ranks"]))
    one = {row["stage"]: row["rate"] for row in rows if row["ranks"] == 1}
    for row in rows:
        if one.get(row["stage"]):
            row["speedup"] = row["rate"] / one[row["stage"]]
            row["efficiency"] = row["speedup"] / row["ranks"]
    return rows


def main(argv=None) -> int:
    args, p = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    info = announce(
        f"preset {p.name}: worlds {args.worlds}, 1 torch thread + 1 loader thread per rank; stage 1: "
        f"{args.s1_images} images x C={p.num_crops}, shards of {args.shard}; stage 2: {args.s2_images} images, "
        f"per-rank batch {p.stage2_batch}, {args.rounds} round(s)")
    with workdir(args, "bench-scaling-") as wd:
        setup_data(args, p, wd)
        launches = [launch(args, p, wd, world) for world in args.worlds]
    rows = summarize(launches)
    table = markdown_table(rows, [("stage", "stage"), ("ranks", "ranks"), ("rate", "global rate"), ("unit", "unit"),
                                  ("speedup", "speed-up vs 1 rank"), ("efficiency", "scaling efficiency"),
                                  ("cpu_ms", "process CPU ms per crop/img (mean of ranks)"),
                                  ("load1", "load avg (1 min)")])
    print("\n" + table)
    finish("scaling", args, info, {
        "preset": p, "worlds": args.worlds, "threads_per_rank": 1, "loader_workers_per_rank": 1,
        "stage1_images": args.s1_images, "stage2_images": args.s2_images, "rounds": args.rounds, "rows": rows,
        "launches": launches, "table": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
