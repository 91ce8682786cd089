"""Fashion-MNIST accuracy: MEAL V2 from the cache vs. online MEAL V2 vs. hard labels, at equal epochs.

Method, targets and sizing: docs/benchmarks.md, section bench_fashion_mnist.

    python -m benchmarks.bench_fashion_mnist                       # full scale (GPU recommended)
    python -m benchmarks.bench_fashion_mnist --train-images 1000 --teacher-train-images 60000 \\
        --teacher-epochs 2 --student-epochs 60 --num-crops 16 --seeds 0,1,2   # the demo's scale
"""
from __future__ import annotations

import dataclasses
from pathlib import Path


import numpy as np
import torch

from benchmarks.harness import (
    LimitedLoader, add_device_args, begin, demo_parser, ints, markdown_table, names, publish, report_head, run_header,
    run_main, say,
)
from common.cache_format import CacheReader
from common.config import load_config, parse_assignments
from common.manifest import load_manifest
from stage1_teacher_cache.label_agreement import cache_label_agreement
from stage2_student_distill import experiment as ex

# --------------------------------------------------------------------------- online targets against the cache


def compare_targets(cfg, batches: int) -> dict | None:
    """Cached vs. live targets on the same crops: the library's online source replaying the cache
    (``distill.replay_cache``) next to the cache's own targets, over the first ``batches`` batches."""
    from stage2_student_distill.train import setup

    job = setup(cfg, "distill")
    n = agree = 0
    max_diff = l1 = kl_sum = 0.0
    for batch in LimitedLoader(job.train_loader, batches).epoch(0):
        cached, online = batch.targets.float(), job.targets(batch)
        diff = (cached - online).abs()
        kl = (torch.xlogy(online, online) - online * torch.log(cached.clamp_min(1e-12))).sum(-1)
        n += online.shape[0]
        max_diff = max(max_diff, float(diff.max()))
        l1 += float(diff.sum())
        kl_sum += float(kl.sum())
        agree += int((cached.argmax(-1) == online.argmax(-1)).sum())
    if not n:
        return None
    return {"samples": n, "abs_diff_max": max_diff, "mean_l1": l1 / n, "mean_kl": kl_sum / n, "argmax_agree": agree / n}


# --------------------------------------------------------------------------- steps


def run_json(r: ex.RunRecord) -> dict:
    """A run as this benchmark's JSON records it (the keys ``report`` reads)."""
    return {"run": r.run_dir, "train_images": r.train_images, "epochs_done": r.epochs, "top1": r.top1,
            "best_top1": r.best_top1, "curve": r.curve, "img_per_s": r.img_per_s, "seconds": r.seconds,
            "cpu_s": r.cpu_s}


def base_config(args, manifests: ex.Manifests):
    """The config every run starts from: this benchmark's recipe (the demo's settings as flags)."""
    cfg = load_config(args.config, {"runtime.device": args.device, "runtime.progress": False,
                                    "runtime.num_workers": args.num_workers, "optim.log_every": 10**9})
    recipe = ex.Recipe(img_size=args.img_size, batch_size=args.batch_size, eval_batch_size=512,
                       eval_every=args.eval_every, lr=args.lr, schedule="cosine", weight_decay=args.weight_decay,
                       loader=args.loader, num_crops=args.num_crops, crop_scale=tuple(args.crop_scale))
    return ex.base_config(cfg, recipe, manifests)


def cached_crop_accuracy(cache_dir: Path, manifest_path: str) -> dict:
    """How often the cached ensemble's top-1 is the label on the students' training crops (the share stage 1
    records as ``label_agreement``, here a fraction), and the mean probability the soft labels give the label."""
    manifest = load_manifest(manifest_path)
    reader = CacheReader(str(cache_dir), manifest_hash=manifest.content_hash)
    # a cache made before stage 1 recorded the agreement (a reused --cache): the library's same count
    agreement = reader.attrs.get("label_agreement") or cache_label_agreement(reader, manifest.labels)
    rows = reader.images(np.arange(reader.num_images))
    true_prob = np.where(rows["topk_index"] == manifest.labels[:, None, None], rows["topk_prob"].astype(np.float32), 0)
    return {"argmax_is_label": agreement["crops_pct"] / 100, "mean_true_class_prob": float(true_prob.sum(-1).mean())}


# --------------------------------------------------------------------------- report


def report(payload: dict) -> str:
    a = payload["args"]
    lines = [
        *report_head(payload, "### Fashion-MNIST benchmark", "."),
        f"* **Data**: students on {a['train_images']:,} training images, teachers on "
        f"{', '.join(fmt_int(t['train_images']) for t in payload['teachers'].values())}, "
        f"evaluated on {a['val_images']:,} test images (class-balanced subsets, centre crop).",
        f"* **Teachers**: {', '.join(a['teachers'])}"
        f"{' (reused: ' + ', '.join(a['teacher_run']) + ')' if a['teacher_run'] else ''} x "
        f"{', '.join(str(t['epochs_done']) for t in payload['teachers'].values())} epochs at "
        f"{a['teacher_img_size'] or a['img_size']} px; cache C = {a['num_crops']} crops/image, crop scale "
        f"{a['crop_scale']}, top-{payload['cache']['topk']} kept. Ensemble top-1 on the test images "
        f"{fmt(payload['cache']['ensemble_top1'])}%; its argmax equals the label on "
        f"{fmt(100 * payload['cache']['train_crops']['argmax_is_label'])}% of the cached training crops.",
        f"* **Student**: {a['student']} at {a['img_size']} px, {a['student_epochs']} epochs, batch {a['batch_size']}, "
        f"SGD lr {a['lr']} cosine, weight decay {a['weight_decay']}, discriminator {'off' if a['no_discriminator'] else 'on'}; "
        f"seeds {a['seeds']}.",
        f"* **Wall time** {payload['minutes']:.1f} min.",
        "",
    ]
    rows = []
    for name, r in payload["teachers"].items():
        # top-1 on this benchmark's test images, measured by teacher-cache on the checkpoint it cached
        rows.append({"model": f"teacher {name} ({fmt_int(r['train_images'])} training images)", "seed": "",
                     "top1": payload["cache"]["teacher_top1"].get(name, r["top1"]), "best": r["best_top1"],
                     "epochs": r["epochs_done"], "img_s": r["img_per_s"], "wall": r["seconds"]})
    rows.append({"model": "teacher ensemble (mean softmax)", "top1": payload["cache"]["ensemble_top1"],
                 "wall": payload["cache"]["seconds"], "img_s": payload["cache"].get("crops_per_s")})
    for seed, runs in payload["students"].items():
        for variant, r in runs.items():
            rows.append({"model": f"student, {VARIANT_NAMES[variant]}", "seed": seed, "top1": r["top1"],
                         "best": r["best_top1"], "epochs": a["student_epochs"], "img_s": r["img_per_s"],
                         "wall": r["seconds"]})
    lines.append(markdown_table(rows, [("model", "model"), ("seed", "seed"), ("top1", "final top-1 (%)"),
                                       ("best", "best top-1 (%)"), ("epochs", "epochs"),
                                       ("img_s", "train img/s (cache: crops/s)"), ("wall", "wall s")]))
    lines += ["", "Teachers' top-1: on these test images, from `teacher-cache`'s evaluation of the cached checkpoints "
                  "(best = their best epoch on their own validation set). Students: the last epoch's top-1."]
    s = payload["summary"]
    lines += ["", "| target | measured (mean over seeds) | met |", "|---|---|---|"]
    for key, target, met in (("cached_minus_hard", "MEAL V2 (cached) - hard labels >= +0.5 points", "met_kd"),
                             ("cached_minus_online", "abs(cached - online) <= 0.3 points", "met_online"),
                             ("cached_minus_fresh", "cached - online with fresh crops (no target; the cache's crop "
                                                    "budget)", None)):
        if s.get(key) is not None:
            lines.append(f"| {target} | {s[key]:+.2f} (per seed {s[key + '_per_seed']}) | "
                         f"{('yes' if s[met] else 'NO') if met else '-'} |")
    if payload.get("online_targets"):
        t = payload["online_targets"]
        lines += ["", f"Cached vs. online targets on the same crops ({t['samples']:,} samples): mean L1 "
                      f"{t['mean_l1']:.2e}, max abs {t['abs_diff_max']:.2e}, mean KL(online || cached) "
                      f"{t['mean_kl']:.2e}, argmax agreement {100 * t['argmax_agree']:.2f}%."]
    return "\n".join(lines) + "\n"


VARIANT_NAMES = {"cached": "MEAL V2 (cached KD)", "online": "MEAL V2 (online KD, same crops)",
                 "fresh": "MEAL V2 (online KD, fresh crops)", "hard": "hard labels"}


def fmt_int(v) -> str:
    return "?" if v is None else f"{v:,}"


def fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


# --------------------------------------------------------------------------- main


def add_student_args(p, cfg, epochs: int) -> None:
    """The student's recipe, seeds and device, the demo's settings as defaults."""
    p.add_argument("--student", default=cfg.demo.student)
    p.add_argument("--student-epochs", type=int, default=epochs)
    p.add_argument("--img-size", type=int, default=cfg.optim.img_size, help="student input size")
    p.add_argument("--batch-size", type=int, default=cfg.optim.batch_size)
    p.add_argument("--lr", type=float, default=cfg.optim.lr)
    p.add_argument("--weight-decay", type=float, default=5e-5, help="as `pipeline demo`")
    p.add_argument("--eval-every", type=int, default=cfg.optim.eval_every, help="epochs between validations (and the last)")
    p.add_argument("--seeds", type=ints, default="0", help="comma list of student seeds (runtime.seed)")
    add_device_args(p)


def parse_args(argv):
    p, cfg = demo_parser(__doc__)
    p.add_argument("--workdir", default="runs/bench-fashion-mnist", help="data, runs and cache (kept; reruns resume)")
    p.add_argument("--train-images", type=int, default=60000, help="students' training images (max 60000)")
    p.add_argument("--val-images", type=int, default=10000, help="test images scored (max 10000)")
    p.add_argument("--teacher-train-images", type=int, default=None,
                   help="teachers' training images (default: --train-images)")
    p.add_argument("--teachers", type=names, default=",".join(cfg.demo.teachers), help="comma list of timm names")
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--teacher-img-size", type=int, default=0, help="teachers' input size (0: --img-size)")
    p.add_argument("--teacher-run", action="append", default=[], metavar="NAME=DIR",
                   help="reuse a trained teacher (DIR/best.pt) instead of training it")
    p.add_argument("--cache", default=None, help="reuse this teacher cache (default: WORKDIR/cache)")
    add_student_args(p, cfg, epochs=30)
    p.add_argument("--num-crops", type=int, default=None, help="cached crops per image (default: --student-epochs)")
    p.add_argument("--crop-scale", type=float, nargs=2, default=list(cfg.crops.scale))
    p.add_argument("--variants", type=names, default="cached,online,hard",
                   help="comma list of cached, online, fresh, hard")
    p.add_argument("--compare-batches", type=int, default=20,
                   help="batches over which cached and live targets are compared (with variant online; 0 = skip)")
    p.add_argument("--no-discriminator", action="store_true", help="KL only (ablation), for cached and online")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/fashion_mnist.json)")
    p.add_argument("--doc", default="docs/results.md", help="markdown file whose marked section is replaced ('' = none)")
    p.add_argument("--doc-tag", default="", help="which marked section of --doc (one per experiment; '' = the demo-scale one)")
    args = p.parse_args(argv)
    args.teacher_train_images = args.teacher_train_images or args.train_images
    args.num_crops = args.num_crops or args.student_epochs
    unknown = set(args.variants) - set(VARIANT_NAMES)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; use cached, online, fresh, hard")
    return args


# this benchmark's variants -> the driver's kinds of run
VARIANT_KINDS = {"cached": "cached", "online": "replay", "fresh": "online", "hard": "hard"}


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start, info, wd = begin(args.workdir)

    # 1. data
    data = ex.FashionMnistData(args.source, str(wd / "data"), args.train_images, args.val_images)
    manifests, data_s, _ = ex.timed(ex.prepare_data, data)
    print(f"data ready in {data_s:.1f} s: students {manifests.train}, test {manifests.val}", flush=True)
    base = base_config(args, manifests)

    # 2. teachers
    reuse = parse_assignments(args.teacher_run, "--teacher-run")
    teachers = {}
    for name in args.teachers:
        if name in reuse:
            teachers[name] = run_json(ex.run_record(reuse[name]))
            continue
        # the teachers' tree only when one is trained here (reused teachers bring their own)
        t_manifest = ex.prepare_data(dataclasses.replace(data, teacher_train_images=args.teacher_train_images))
        teachers[name] = run_json(ex.train(base, ex.ModelRun(
            "hard", name, wd / f"teacher_{name}", args.teacher_epochs,
            overrides={"data.manifest": t_manifest.teacher_train,
                       "optim.img_size": args.teacher_img_size or args.img_size}), say))
    ensemble = ex.Teachers.from_runs({name: r["run"] for name, r in teachers.items()})

    # 3. cache
    cache_dir = Path(args.cache or wd / "cache")
    cache = ex.build_cache(base, ex.CacheSpec(cache_dir, ensemble, manifests.val, {"teacher_cache.batch_size": 256}))
    written = cache.summary["shards_written"]
    top1 = ex.teacher_top1(cache.evaluation)
    cache_info = {
        "path": str(cache_dir), "seconds": cache.seconds if written else None, "cpu_s": cache.cpu_s,
        "crops_per_s": cache.summary["crops_per_s"] if written else None,
        "topk": CacheReader(str(cache_dir)).topk,
        "ensemble_top1": top1.ensemble,
        "teacher_top1": top1.teachers,
        "train_crops": cached_crop_accuracy(cache_dir, manifests.train),
    }
    print(f"cache: ensemble {cache_info['ensemble_top1']}% on the test images; argmax = label on "
          f"{100 * cache_info['train_crops']['argmax_is_label']:.2f}% of the cached training crops", flush=True)

    # 4. students
    def student(variant: str, seed: int, run_dir: Path) -> ex.ModelRun:
        """cached: `pipeline distill --cache`; online: `--online --replay-cache`; fresh: `--online`;
        hard: `pipeline train`."""
        kind = VARIANT_KINDS[variant]
        keys = {"runtime.seed": seed} if kind == "hard" else {"runtime.seed": seed,
                                                              "distill.discriminator": not args.no_discriminator}
        return ex.ModelRun(kind, args.student, run_dir, args.student_epochs, str(cache_dir), ensemble, keys)

    students: dict[str, dict] = {}
    online_stats = None
    for seed in args.seeds:
        runs = {}
        for variant in args.variants:
            runs[variant] = run_json(ex.train(base, student(variant, seed, wd / f"seed{seed}" / variant), say))
            print(f"seed {seed} {variant}: top-1 {runs[variant]['top1']}", flush=True)
        students[str(seed)] = runs
    if "online" in args.variants and args.compare_batches > 0:
        check = student("online", args.seeds[0], wd / "targets-check")
        online_stats = compare_targets(ex.run_config(base, check), args.compare_batches)

    def deltas(a, b):
        per = [round(r[a]["top1"] - r[b]["top1"], 2) for r in students.values()
               if a in r and b in r and r[a]["top1"] is not None and r[b]["top1"] is not None]
        return (float(np.mean(per)) if per else None), per

    kd, kd_per = deltas("cached", "hard")
    on, on_per = deltas("cached", "online")
    fr, fr_per = deltas("cached", "fresh")
    payload = {
        **run_header(args, t_start, info),
        "data_seconds": data_s,
        "teachers": teachers,
        "cache": cache_info,
        "students": students,
        "online_targets": online_stats,
        "summary": {
            "cached_minus_hard": kd, "cached_minus_hard_per_seed": kd_per,
            "met_kd": kd is not None and min(kd_per) >= 0.5,
            "cached_minus_online": on, "cached_minus_online_per_seed": on_per,
            "met_online": on is not None and max(abs(v) for v in on_per) <= 0.3,
            "cached_minus_fresh": fr, "cached_minus_fresh_per_seed": fr_per,
        },
    }
    publish("fashion_mnist", payload, args.out, report(payload), args.doc, args.doc_tag)
    return 0


if __name__ == "__main__":
    run_main(main)
