"""What the cache's k costs the distilled student: the same student from top-k caches of the same crops.

Method, targets and sizing: docs/benchmarks.md, section bench_topk_student.

    python -m benchmarks.bench_fashion_mnist --train-images 1000 --teacher-train-images 60000 \\
        --teacher-epochs 2 --student-epochs 60 --num-crops 16 --seeds 0 --variants cached --workdir W
    python -m benchmarks.bench_topk_student --cache W/cache --workdir W/topk --topk 1,2,3,5,10 --seeds 0,1,2
"""
from __future__ import annotations

from pathlib import Path


import numpy as np
import torch

from benchmarks.bench_fashion_mnist import add_student_args, base_config, fmt, run_json
from benchmarks.harness import begin, demo_parser, markdown_table, names, publish, report_head, run_header, run_main
from common.cache_format import CacheReader
from common.cache_storage import restore_targets
from stage2_student_distill import experiment as ex
from stage1_teacher_cache.info import cache_info
from stage1_teacher_cache.sharing import reduce_topk

def fidelity(reference: CacheReader, reduced: CacheReader, block: int = 4096) -> dict:
    """Mean top-k mass and KL(reference target || reduced target) over every cached crop, in nats."""
    classes, mass, kl, rows = reference.num_classes, 0.0, 0.0, 0
    for start in range(0, reference.num_images, block):
        ids = np.arange(start, min(start + block, reference.num_images))
        ref, red = reference.images(ids), reduced.images(ids)
        p = restore_targets(ref["topk_index"], ref["topk_prob"], classes).reshape(-1, classes).double()
        q = restore_targets(red["topk_index"], red["topk_prob"], classes).reshape(-1, classes).double()
        kl += float((torch.xlogy(p, p) - p * q.clamp_min(1e-300).log()).sum())
        mass += float(red["topk_prob"].astype(np.float64).sum())
        rows += p.shape[0]
    return {"mean_topk_mass": mass / rows, "mean_kl": kl / rows, "crops": rows}


def report(payload: dict) -> str:
    a, ref = payload["args"], payload["reference"]
    lines = [
        *report_head(payload, "#### Student accuracy vs. k", "."),
        f"* **Cache**: `{a['cache']}` ({ref['num_classes']} classes, {ref['num_crops']} crops x "
        f"{ref['num_images']:,} images, top-{ref['k']} kept = the reference"
        f"{', i.e. the full softmax' if ref['k'] == ref['num_classes'] else ''}); "
        f"teachers {', '.join(ref['teachers'])}; smaller k by `pipeline cache reduce`.",
        f"* **Student**: {a['student']} at {a['img_size']} px, {a['student_epochs']} epochs, batch {a['batch_size']}, "
        f"SGD lr {a['lr']} cosine, weight decay {a['weight_decay']}, discriminator on; seeds {a['seeds']}; "
        f"scored on {a['val_images']:,} test images; stage 2 loader `{a['loader']}`. "
        f"Wall time {payload['minutes']:.1f} min.",
        "",
    ]

    def per_seed(name: str) -> list[float | None]:
        return [payload["students"][str(s)].get(name, {}).get("top1") for s in a["seeds"]]

    def mean(values) -> str:
        values = [v for v in values if v is not None]
        return fmt(float(np.mean(values)) if values else None)

    rows, hard = [], per_seed("hard")
    for k in payload["ks"]:
        c, top1 = payload["caches"][str(k)], per_seed(f"k{k}")
        gains = [x - h for x, h in zip(top1, hard) if x is not None and h is not None]
        rows.append({"k": k, "bytes": c["bytes_per_crop"], "mass": c["mean_topk_mass"], "kl": max(0.0, c["mean_kl"]),
                     "seeds": " / ".join(fmt(v) for v in top1), "mean": mean(top1),
                     "delta": f"{round(float(np.mean(gains)), 2):+.2f}" if gains else "n/a"})
    if "hard" in a["variants"]:
        rows.append({"k": "hard labels", "seeds": " / ".join(fmt(v) for v in hard), "mean": mean(hard)})
    lines.append(markdown_table(rows, [
        ("k", "k"), ("bytes", "bytes/crop on disk"), ("mass", "mean top-k mass"),
        ("kl", "mean KL(ref ‖ top-k), nats"), ("seeds", "student top-1 per seed (%)"), ("mean", "mean top-1 (%)"),
        ("delta", "mean - hard labels")]))
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p, cfg = demo_parser(__doc__)
    demo = cfg.demo
    p.add_argument("--cache", required=True, help="a Fashion-MNIST teacher cache (its k is the reference)")
    p.add_argument("--workdir", default="runs/bench-topk-student", help="data, caches and runs (kept; reruns resume)")
    p.add_argument("--data-dir", default=None, help="where the PNG trees are (default WORKDIR/data)")
    p.add_argument("--val-images", type=int, default=demo.val_images, help="test images scored (max 10000)")
    p.add_argument("--topk", default="1,2,3,5,10", help="comma list of k (each <= the cache's)")
    add_student_args(p, cfg, epochs=demo.student_epochs)
    p.add_argument("--variants", type=names, default="topk,hard", help="topk (the k sweep) and/or hard (the baseline)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/topk_student.json)")
    p.add_argument("--doc", default="docs/performance.md", help="file whose marked section is replaced ('' = none)")
    args = p.parse_args(argv)
    args.ks = sorted({int(k) for k in args.topk.split(",") if k.strip()})
    if set(args.variants) - {"topk", "hard"}:
        p.error("--variants: use topk and/or hard")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start, info, wd = begin(args.workdir)

    reference = CacheReader(args.cache, verify_checksums=True)
    if max(args.ks) > reference.topk:
        raise SystemExit(f"--topk {max(args.ks)}: {args.cache} keeps only k = {reference.topk}")
    # the students' manifest is rebuilt from the idx files; the cache's manifest hash must match it
    data_dir = Path(args.data_dir or wd / "data")
    manifests = ex.prepare_data(ex.FashionMnistData(args.source, str(data_dir), reference.num_images,
                                                    args.val_images))
    crops = reference.attrs["crops"]
    args.num_crops, args.crop_scale = int(crops["num_crops"]), tuple(crops["scale"])  # the hard baseline's policy
    base = base_config(args, manifests)

    caches = {}
    for k in args.ks:
        path = args.cache if k == reference.topk else str(wd / f"cache-k{k}")
        if k != reference.topk:
            reduce_topk(args.cache, path, k)
        caches[str(k)] = {"path": path, "bytes_per_crop": cache_info(path)["bytes_per_crop"],
                          **fidelity(reference, CacheReader(path))}
        print(f"k = {k}: {caches[str(k)]}", flush=True)

    students: dict[str, dict] = {}
    names = ([f"k{k}" for k in args.ks] if "topk" in args.variants else []) + (
        ["hard"] if "hard" in args.variants else [])
    for seed in args.seeds:
        runs = {}
        for name in names:
            run = ex.ModelRun("hard" if name == "hard" else "cached", args.student, wd / f"seed{seed}" / name,
                              args.student_epochs, "" if name == "hard" else caches[name[1:]]["path"],
                              overrides={"runtime.seed": seed})
            runs[name] = run_json(ex.train(base, run, lambda msg: print(f"seed {seed}: {msg}", flush=True)))
            print(f"seed {seed} {name}: top-1 {runs[name]['top1']}", flush=True)
        students[str(seed)] = runs

    payload = {
        **run_header(args, t_start, info),
        "ks": args.ks,
        "reference": {"path": args.cache, "k": reference.topk, "num_classes": reference.num_classes,
                      "num_images": reference.num_images, "num_crops": reference.num_crops,
                      "teachers": [t["name"] for t in reference.attrs["teachers"]]},
        "caches": caches,
        "students": students,
    }
    publish("topk_student", payload, args.out, report(payload), args.doc)
    return 0


if __name__ == "__main__":
    run_main(main)
