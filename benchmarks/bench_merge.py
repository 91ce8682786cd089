"""Precision lost by `pipeline cache merge`: merging top-k caches vs merging full softmaxes.

Method, targets and sizing: docs/benchmarks.md, section bench_merge.

    python -m benchmarks.bench_merge [--crops 4000 --classes 1000]
"""
from __future__ import annotations

import argparse

import numpy as np
import torch


from common.cache_storage import restore_targets, round_down_fp16
from stage1_teacher_cache.sharing import merge_targets

# name -> true-class logit boost (look-alikes get 2.5 less); shared and per-teacher noise are N(0, 1), N(0, 0.7)
REGIMES = {"confident": 12.0, "typical": 9.0, "uncertain": 6.5}
LOOK_ALIKES = 4
SPLITS = {"2 caches of 2 teachers": [2, 2], "3 caches (2+1+1 teachers)": [2, 1, 1]}
KS = (1, 5, 10, 20, 50, 100)


def teacher_softmaxes(rng, crops: int, classes: int, teachers: int, regime: str) -> np.ndarray:
    boost = REGIMES[regime]
    shared = rng.normal(size=(crops, classes))
    rows = np.arange(crops)[:, None]
    picked = np.argsort(rng.random((crops, classes)), axis=-1)[:, : 1 + LOOK_ALIKES]  # distinct classes
    shared[rows, picked[:, :1]] += boost
    shared[rows, picked[:, 1:]] += boost - 2.5
    logits = shared[None] + rng.normal(size=(teachers, crops, classes)) * 0.7
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(-1, keepdims=True)  # [teachers, crops, classes]


def store_topk(dense: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """What a cache holds for these targets: top-k indices and float16 (rounded down) probabilities."""
    top = torch.topk(torch.from_numpy(dense), k, dim=-1)
    return {"topk_index": top.indices.numpy()[:, None], "topk_prob": round_down_fp16(top.values.numpy())[:, None]}


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.mean(np.sum(p * (np.log(np.clip(p, 1e-30, None)) - np.log(np.clip(q, 1e-30, None))), -1)))


def measure(rng, crops: int, classes: int, regime: str, split: list[int]) -> list[dict]:
    probs = teacher_softmaxes(rng, crops, classes, sum(split), regime)
    bounds = np.cumsum([0, *split])
    groups = [probs[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:])]
    weights = np.array(split, dtype=np.float64) / sum(split)
    full = probs.mean(0)
    rows = []
    for k in KS:
        one = store_topk(full, k)
        one_dense = restore_targets(one["topk_index"][:, 0], one["topk_prob"][:, 0], classes).double().numpy()
        index, prob = merge_targets([store_topk(g, k) for g in groups], weights, classes, k)
        merged = restore_targets(index[:, 0], prob[:, 0], classes).double().numpy()
        rows.append({
            "k": k,
            "kept_mass": float(np.sort(full, -1)[:, ::-1][:, :k].sum(-1).mean()),
            "kl_one_run": kl(full, one_dense),
            "kl_merged": kl(full, merged),
            "top1_agree": float((merged.argmax(-1) == full.argmax(-1)).mean()),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crops", type=int, default=4000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for regime in REGIMES:
        full = teacher_softmaxes(np.random.default_rng(args.seed), args.crops, args.classes, 4, regime).mean(0)
        print(f"\n### {regime} ensemble: mean top-1 probability {full.max(-1).mean():.2f}, "
              f"entropy {-(full * np.log(full)).sum(-1).mean():.2f} nats ({args.crops} crops, {args.classes} classes)")
        for name, split in SPLITS.items():
            rows = measure(np.random.default_rng(args.seed), args.crops, args.classes, regime, split)
            print(f"\n{name}\n\n| k | mass in top-k | KL(full ‖ one run) | KL(full ‖ merged) | top-1 agree |\n"
                  "|---:|---:|---:|---:|---:|")
            for r in rows:
                print(f"| {r['k']} | {r['kept_mass']:.3f} | {r['kl_one_run']:.4f} | {r['kl_merged']:.4f} | "
                      f"{r['top1_agree']:.4f} |")


if __name__ == "__main__":
    main()
