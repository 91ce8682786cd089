"""Teacher-cache benchmark: size on disk, read rate, top-k fidelity, and FKD-style files.

Method, targets and sizing: docs/benchmarks.md, section bench_cache.

    python -m benchmarks.bench_cache            # full run, a few minutes on 2 cores
    python -m benchmarks.bench_cache --quick    # smoke run, < 30 s
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch


from benchmarks.harness import (
    IMAGENET_TRAIN_IMAGES, add_out_arg, add_quick_arg, command_line, disk_usage, ints, machine_info, md_table,
    synthetic_cache_attrs, workdir, write_results,
)
from common.cache_format import CacheReader, CacheWriter
from common.cache_storage import restore_targets
from common.crops import image_boxes
from stage2_student_distill.plan import shard_local_share

# Stage 2 consumption we compare against (assumptions, not measurements):
# ResNet-50 training in bf16 + channels_last with DALI runs at roughly 3,000
# img/s on one H100; a node of 8 is ~24,000 img/s. Under torchrun every rank
# has its own loader and its own CacheReader, so the per-GPU figure is what one
# reader process must sustain; the node figure is what a single shared reader
# would need. Target: reader >= 10x consumption, so target lookup is never the
# bottleneck (and leaves the CPU to JPEG decoding, which is the real one).
ASSUMED_CONSUMPTION = {"resnet50_1xH100": 3_000, "resnet50_8xH100": 24_000}


# --------------------------------------------------------------------------- synthetic soft labels


class SoftLabelModel:
    """Ensemble-like soft labels: the mean of two teachers' softmaxes over correlated logits
    (the model and its calibration: docs/benchmarks.md, section bench_cache)."""

    def __init__(self, num_classes: int, seed: int, alpha=(1.5, 4.0), ambiguous=0.15, sigma=0.5, rho=0.5, jitter=0.15):
        rng = np.random.default_rng(seed)
        K = num_classes
        rank = np.empty((K, K), np.float32)
        self.neighbours = np.empty((K, 5), np.int64)
        for y in range(K):
            order = np.concatenate([[y], rng.permutation(np.delete(np.arange(K), y))])
            rank[y, order] = np.arange(K)
            self.neighbours[y] = order[1:6]
        self.log_rank = np.log1p(rank)  # [K, K]: row y = distance of every class from y
        self.num_classes = K
        self.alpha, self.ambiguous, self.sigma, self.rho, self.jitter = alpha, ambiguous, sigma, rho, jitter

    def sample(self, rng: np.random.Generator, labels: np.ndarray, num_crops: int) -> torch.Tensor:
        """[len(labels) * num_crops, K] float32 ensemble probabilities, crops of one image adjacent."""
        M, K = len(labels) * num_crops, self.num_classes
        dominant = np.repeat(labels, num_crops)
        amb = rng.random(M) < self.ambiguous
        dominant[amb] = self.neighbours[dominant[amb], rng.integers(0, 5, amb.sum())]
        alpha = np.exp(rng.uniform(*np.log(self.alpha), (M, 1))).astype(np.float32)
        base = self.log_rank[dominant]
        shared = rng.standard_normal((M, K), dtype=np.float32)
        probs = torch.zeros(M, K)
        for _ in range(2):  # two teachers
            a = alpha * rng.uniform(1 - self.jitter, 1 + self.jitter, (M, 1)).astype(np.float32)
            own = rng.standard_normal((M, K), dtype=np.float32)
            noise = self.sigma * (self.rho * shared + np.sqrt(1 - self.rho**2) * own)
            probs += torch.softmax(torch.from_numpy(-a * base + noise), dim=-1)
        return probs / 2


def imagenet_like_sizes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Width/height like ImageNet train: mostly 500 px on the long side, 4:3-ish, some outliers."""
    long_side = np.where(rng.random(n) < 0.75, 500, rng.integers(150, 1600, n))
    aspect = rng.choice([4 / 3, 4 / 3, 3 / 2, 1.0, 5 / 4, 16 / 9], n)
    short_side = np.maximum(1, np.round(long_side / aspect)).astype(np.int64)
    landscape = rng.random(n) < 0.8
    return np.where(landscape, long_side, short_side), np.where(landscape, short_side, long_side)


def generate(args, model: SoftLabelModel) -> dict:
    """Boxes, flips and the top-kmax of every crop, plus fidelity statistics for every k.

    Processed shard by shard so that the dense [N*C, 1000] probabilities never
    exist all at once (20,000 x 10 crops would be 800 MB in float32).
    """
    rng = np.random.default_rng(args.seed)
    N, C, K, ks = args.images, args.crops, args.classes, args.ks
    kmax = max(ks)
    widths, heights = imagenet_like_sizes(rng, N)
    labels = rng.integers(0, K, N)  # a shuffled manifest: neighbouring image ids share no class
    b = image_boxes(args.seed, np.arange(N), widths, heights, C)
    out = {
        "boxes": b.as_array(),
        "flip": b.flip,
        "topk_index": np.empty((N, C, kmax), np.uint16),
        "topk_prob": np.empty((N, C, kmax), np.float16),
    }
    kl = {k: [] for k in ks}  # as stored (float16), per row
    kl32 = {k: [] for k in ks}  # truncation alone (top-k kept in float32)
    mass = {k: [] for k in ks}
    top1, top5, top10, entropy = [], [], [], []
    for start in range(0, N, args.images_per_shard):
        stop = min(start + args.images_per_shard, N)
        p = model.sample(rng, labels[start:stop], C)
        val, idx = p.topk(kmax, dim=-1, sorted=True)
        out["topk_index"][start:stop] = idx.numpy().astype(np.uint16).reshape(stop - start, C, kmax)
        out["topk_prob"][start:stop] = val.numpy().astype(np.float16).reshape(stop - start, C, kmax)
        cum = val.cumsum(-1)
        top1.append(val[:, 0].numpy())
        top5.append(cum[:, 4].numpy())
        top10.append(cum[:, min(9, kmax - 1)].numpy())
        neg_entropy = torch.special.xlogy(p, p).sum(-1)  # float32 is ample for KLs of 1e-3..1 nats
        entropy.append(-neg_entropy.numpy())

        def kl_to(q: torch.Tensor) -> np.ndarray:
            # KL(p || q); q = 0 where p > 0 makes it infinite (see "zero residual" below).
            return (neg_entropy - torch.special.xlogy(p, q).sum(-1)).numpy()

        for k in ks:
            idx_k = idx[:, :k].numpy().astype(np.uint16)
            # Exactly what stage 2 trains on: the float16 top-k as stored, restored densely.
            kl[k].append(kl_to(restore_targets(idx_k, val[:, :k].numpy().astype(np.float16), K)))
            kl32[k].append(kl_to(restore_targets(idx_k, val[:, :k].numpy(), K)))
            mass[k].append(cum[:, k - 1].numpy())
    cat = np.concatenate
    top1, top5, top10, entropy = cat(top1), cat(top5), cat(top10), cat(entropy)
    out["label_stats"] = {
        "top1_mean": float(top1.mean()), **{f"top1_p{q}": float(np.percentile(top1, q)) for q in (10, 50, 90)},
        "top5_mass_mean": float(top5.mean()),
        "top10_mass_mean": float(top10.mean()),
        "entropy_nats_mean": float(entropy.mean()),
    }
    out["fidelity"] = {}
    for k in ks:
        kls, kls32, m = cat(kl[k]), cat(kl32[k]), cat(mass[k])
        # float16 rounding can push the kept mass to >= 1: restore_targets then spreads a
        # residual of 0, the tail gets probability 0 and KL(p || q) is infinite for that row.
        finite = np.isfinite(kls)
        out["fidelity"][k] = {
            "kl_mean": float(kls[finite].mean()),
            "kl_p50": float(np.percentile(kls[finite], 50)),
            "kl_p99": float(np.percentile(kls[finite], 99)),
            "kl_mean_float32_topk": float(kls32.mean()),
            "mass_kept_mean": float(m.mean()),
            "mass_kept_p10": float(np.percentile(m, 10)),
            "rows_with_zero_residual": int((~finite).sum()),
            "rows_with_zero_residual_frac": float((~finite).mean()),
        }
    return out


# --------------------------------------------------------------------------- sizes


def write_cache(path: Path, args, data: dict, k: int, num_images: int | None = None) -> float:
    """Write a cache with the first k classes of `data`; returns seconds.

    With num_images > len(data) the shards are tiled (shard s gets the data of
    shard s mod S): an ImageNet-sized cache with realistic per-shard contents,
    without generating 12.8M soft labels. Zarr compresses each shard on its own,
    so sizes and decode costs per shard are those of the real data.
    """
    n_data = len(data["boxes"])
    num_images = num_images or n_data
    ips = args.images_per_shard
    attrs = synthetic_cache_attrs(f"synthetic-seed{args.seed}-n{num_images}", num_images,
                                  [f"n{i:08d}" for i in range(args.classes)], args.crops, k, ips, args.seed)
    writer = CacheWriter(path, attrs)
    full_shards = max(1, n_data // ips)
    t0 = time.perf_counter()
    for s in range(writer.layout.num_shards):
        start, stop = writer.shard_range(s)
        src = ((s % full_shards) * ips) if num_images > n_data else start
        rows = slice(src, src + (stop - start))
        writer.write_shard(s, data["boxes"][rows], data["flip"][rows],
                           data["topk_index"][rows, :, :k], data["topk_prob"][rows, :, :k])
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- read rates


class CountingReader(CacheReader):
    """CacheReader that counts shard decodes (LRU misses): the cost driver of random access.

    A miss is detected as a read of a data array below read_shard, so this relies
    only on CacheReader decoding a shard through self.arrays, not on its LRU internals.
    """

    def __init__(self, path, max_cached_shards: int = 64):
        super().__init__(path, max_cached_shards=max_cached_shards)
        self.lru_shards = max_cached_shards
        self.decodes = 0
        self.arrays = dict(self.arrays, topk_prob=_CountReads(self.arrays["topk_prob"], self))


class _CountReads:
    """Array proxy: each slice read of topk_prob is one shard decode."""

    def __init__(self, array, owner: CountingReader):
        self._array, self._owner = array, owner

    def __getitem__(self, key):
        self._owner.decodes += 1
        return self._array[key]

    def __getattr__(self, name):
        return getattr(self._array, name)


def restore_seconds_per_batch(data: dict, k: int, num_classes: int, batch: int, reps: int = 50) -> float:
    """CPU cost of restore_targets for one batch (on a GPU it would be negligible)."""
    idx, prob = data["topk_index"][:batch, 0, :k], data["topk_prob"][:batch, 0, :k]
    restore_targets(idx, prob, num_classes)
    t0 = time.perf_counter()
    for _ in range(reps):
        restore_targets(idx, prob, num_classes)
    return (time.perf_counter() - t0) / reps


def rates(crops: int, t_gather: float, t_restore: float) -> dict:
    """Crops per second of gather + restore, and of the gather alone."""
    return {"crops_per_s": crops / (t_gather + t_restore) if t_gather + t_restore > 0 else float("inf"),
            "gather_only_crops_per_s": crops / t_gather if t_gather > 0 else float("inf")}


def timed_reads(fetch, batches, num_classes: int) -> dict:
    """``fetch(ids, crops)`` (the top-k rows) then restore_targets for each (ids, crops) of ``batches``,
    each part timed on its own; drawing the batches is not timed."""
    t_gather = t_restore = 0.0
    crops = 0
    for ids, crop_ids in batches:
        t0 = time.perf_counter()
        rows = fetch(ids, crop_ids)
        t1 = time.perf_counter()
        restore_targets(rows["topk_index"], rows["topk_prob"], num_classes)
        t_gather, t_restore = t_gather + t1 - t0, t_restore + time.perf_counter() - t1
        crops += len(ids)
    return rates(crops, t_gather, t_restore)


def random_batches(rng, num_images: int, num_crops: int, batch: int, n_batches: int):
    return ((rng.integers(0, num_images, batch), rng.integers(0, num_crops, batch)) for _ in range(n_batches))


def bench_random(reader: CountingReader, rng, batch: int, n_batches: int, prewarm: bool) -> dict:
    """Random (image, crop) batches: one gather + one restore per batch, as a naive loader would."""
    if prewarm:  # decode every shard once, so the timed loop sees a resident cache
        for s in range(reader.layout.num_shards):
            reader.read_shard(s)
    reader.decodes = 0
    batches = random_batches(rng, reader.num_images, reader.num_crops, batch, n_batches)
    return {**timed_reads(reader.gather, batches, reader.num_classes),
            "shard_decodes_per_batch": reader.decodes / n_batches, "batches": n_batches,
            "lru_shards": reader.lru_shards, "num_shards": reader.layout.num_shards}


def bench_sequential(reader: CountingReader, rng, batch: int, max_crops: int) -> dict:
    """Epoch order by shard: shards in random order, images shuffled within a shard, one random
    crop each. Each shard is decoded once and serves images_per_shard crops."""
    L = reader.layout
    order = []
    for s in rng.permutation(L.num_shards):
        start = s * L.images_per_shard
        order.append(start + rng.permutation(min(L.images_per_shard, L.num_images - start)))
        if sum(map(len, order)) >= max_crops:
            break
    ids = np.concatenate(order)[:max_crops]
    crops = rng.integers(0, L.num_crops, len(ids))
    reader.decodes = 0
    batches = ((ids[b : b + batch], crops[b : b + batch]) for b in range(0, len(ids), batch))
    return {**timed_reads(reader.gather, batches, L.num_classes),
            "shard_decodes_per_batch": reader.decodes / -(-len(ids) // batch), "crops": int(len(ids)),
            "lru_shards": reader.lru_shards, "num_shards": L.num_shards}


def bench_epoch_gather(reader: CountingReader, rng, batch: int, world_size: int, restore_s: float,
                       shard_local: bool = True) -> dict:
    """Stage 2's pattern (stage2_student_distill/loaders.py): at the start of an epoch a rank
    gathers its whole share (1/world_size of the images, one crop each) in ONE call, then
    restores one batch at a time. ``shard_local``: the share stage 2 takes now
    (``plan.shard_local_share``: ~1/world_size of the shards); otherwise the strided share of
    a global shuffle it took before, which makes every rank decode every shard."""
    N, C = reader.num_images, reader.num_crops
    if shard_local and world_size > 1:
        ids = shard_local_share(int(rng.integers(1 << 30)), 0, N, 0, world_size, reader.layout.images_per_shard)
    else:
        ids = rng.permutation(N)[: N // world_size]
    crops = rng.integers(0, C, len(ids))
    reader.decodes = 0
    t0 = time.perf_counter()
    reader.gather(ids, crops)
    t_gather = time.perf_counter() - t0
    return {**rates(len(ids), t_gather, restore_s * -(-len(ids) // batch)), "epoch_gather_s": t_gather, "crops": int(len(ids)), "world_size": world_size,
            "shares": "shard-local" if shard_local and world_size > 1 else "strided",
            "shard_decodes": reader.decodes, "num_shards": reader.layout.num_shards}


# --------------------------------------------------------------------------- FKD-style per-image files


def fkd_path(root: Path, image_id: int) -> Path:
    # ~1,000 files per directory, like FKD's ImageNet tree (1,000 class folders of ~1,281 files).
    return root / f"{image_id // 1000:05d}" / f"{image_id:08d}.pt"


def write_fkd(root: Path, data: dict, k: int) -> float:
    """One torch.save file per image with its C crops, in the same dtypes as the Zarr cache
    (int16 holds the class ids < 32768 that uint16 would; wider dtypes would only make FKD bigger)."""
    t0 = time.perf_counter()
    for i in range(len(data["boxes"])):
        path = fkd_path(root, i)
        path.parent.mkdir(parents=True, exist_ok=True)
        # np.array(...) copies: torch.save writes a tensor's whole storage, and a tensor made
        # from a numpy view would drag the rest of the N-image array into every file.
        torch.save({
            "boxes": torch.from_numpy(np.array(data["boxes"][i])),
            "flip": torch.from_numpy(np.array(data["flip"][i])),
            "topk_index": torch.from_numpy(data["topk_index"][i, :, :k].astype(np.int16)),
            "topk_prob": torch.from_numpy(np.array(data["topk_prob"][i, :, :k])),
        }, path)
    return time.perf_counter() - t0


def bench_fkd_random(root: Path, rng, num_images: int, num_crops: int, num_classes: int, batch: int, n_batches: int) -> dict:
    """Random (image, crop) batches: one torch.load(weights_only=True) per sample, as FKD's loader does."""
    def fetch(ids, crops) -> dict:
        files = [(torch.load(fkd_path(root, i), weights_only=True), c) for i, c in zip(ids.tolist(), crops.tolist())]
        return {"topk_index": torch.stack([d["topk_index"][c] for d, c in files]).numpy().astype(np.uint16),
                "topk_prob": torch.stack([d["topk_prob"][c] for d, c in files]).numpy()}

    batches = random_batches(rng, num_images, num_crops, batch, n_batches)
    return {**timed_reads(fetch, batches, num_classes), "batches": n_batches}


# --------------------------------------------------------------------------- environment and report


def report(res: dict) -> str:
    a, out = res["args"], []
    s = res["label_stats"]
    out.append(f"Synthetic ensemble soft labels ({a['images']:,} images x {a['crops']} crops, {a['classes']} classes): "
               f"top-1 mean {s['top1_mean']:.3f} (p10 {s['top1_p10']:.2f}, p50 {s['top1_p50']:.2f}, p90 {s['top1_p90']:.2f}), "
               f"top-5 mass {s['top5_mass_mean']:.3f}, top-10 mass {s['top10_mass_mean']:.3f}, "
               f"entropy {s['entropy_nats_mean']:.2f} nats\n")
    rows = []
    for k, v in res["storage"].items():
        per = v["per_array_bytes_per_crop"]
        rows.append([k, f"{v['bytes_per_crop_apparent']:.1f}", f"{v['bytes_per_crop_allocated']:.1f}",
                     f"{per['topk_index']:.1f} / {per['topk_prob']:.1f} / {per['boxes'] + per['flip']:.1f}",
                     v["files"], f"{v['imagenet_gb']:.2f}", f"{v['write_s']:.1f}"])
    out.append("**1. Size on disk (Zarr cache v1)**\n")
    out.append(md_table(["k", "B/crop apparent", "B/crop allocated", "index / prob / box+flip B/crop", "files",
                         f"ImageNet-1k x {a['crops']} crops (GB, allocated)", "write s"], rows))
    c1, c8 = ASSUMED_CONSUMPTION["resnet50_1xH100"], ASSUMED_CONSUMPTION["resnet50_8xH100"]
    rows = [[name, f"{v['crops_per_s']:,.0f}", f"{v['gather_only_crops_per_s']:,.0f}", v.get("note", ""),
             f"{v['crops_per_s'] / c1:.1f}x", f"{v['crops_per_s'] / c8:.2f}x"] for name, v in res["read"].items()]
    out.append(f"\n**2. Read rate, single process, k = {a['read_k']}, batch {a['batch']}** "
               f"(restore_targets on CPU: {res['restore_ms_per_batch']:.2f} ms/batch)\n")
    out.append(md_table(["pattern", "crops/s (gather+restore)", "crops/s (gather only)", "detail",
                         f"vs 1 GPU ({c1:,}/s)", f"vs 8 GPUs ({c8:,}/s)"], rows))
    rows = [[k, f"{v['mass_kept_mean']:.3f} ({v['mass_kept_p10']:.3f})", f"{v['kl_mean_float32_topk']:.4f}",
             f"{v['kl_mean']:.4f}", f"{v['kl_p50']:.4f} / {v['kl_p99']:.4f}",
             f"{100 * v['rows_with_zero_residual_frac']:.2f}%"] for k, v in res["fidelity"].items()]
    out.append("\n**3. Fidelity of the restored top-k target** (KL in nats; 'as stored' excludes the rows "
               "whose float16 top-k sums to >= 1, where it is infinite)\n")
    out.append(md_table(["k", "mass kept mean (p10)", "KL(full‖restored), top-k in float32",
                         "KL mean, as stored (float16)", "as stored p50 / p99", "rows with zero residual"], rows))
    f, z = res["fkd"], res["storage"][str(a["fkd_k"])]
    out.append(f"\n**4. Zarr vs FKD-style per-image torch.save files (k = {a['fkd_k']}, same data)**\n")
    out.append(md_table(
        ["format", "files", "apparent MB", "allocated MB", "B/crop apparent", "B/crop allocated",
         "ImageNet-1k GB (allocated)", "random read crops/s"],
        [[name, v["files"], f"{v['apparent'] / 1e6:.2f}", f"{v['allocated'] / 1e6:.2f}",
          f"{v['bytes_per_crop_apparent']:.1f}", f"{v['bytes_per_crop_allocated']:.1f}", f"{v['imagenet_gb']:.2f}",
          f"{random_read['crops_per_s']:,.0f}"]
         for name, v, random_read in (("Zarr v1", z, res["read"]["random, all shards resident"]),
                                      ("FKD per-image", f, f["random"]))]
        + [["FKD / Zarr", "", f"{f['apparent'] / z['apparent']:.1f}x", f"{f['allocated'] / z['allocated']:.1f}x", "", "", "", ""]]))
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20_000, help="N images in the synthetic cache")
    p.add_argument("--crops", type=int, default=10, help="C crops per image")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--ks", type=ints, default="1,5,10,20", help="kept classes to compare")
    p.add_argument("--read-k", type=int, default=10, help="k of the cache used for read rates (pipeline.toml default)")
    p.add_argument("--fkd-k", type=int, default=10, help="k of the FKD-style comparison")
    p.add_argument("--images-per-shard", type=int, default=1024, help="pipeline.toml default")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=200, help="timed random batches (fewer for the slow patterns)")
    p.add_argument("--imagenet-scale", action=argparse.BooleanOptionalAction, default=True,
                   help="also time reads on an ImageNet-sized cache tiled from the synthetic shards (~0.5 GB of disk)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 1 = what one loader thread gets, and stable on a busy machine "
                        "(intra-op threads of small ops slow down badly when cores are oversubscribed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where the caches go (default: a temp dir, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the written caches")
    add_out_arg(p)
    add_quick_arg(p, help="smoke run: 500 images, few batches, no ImageNet-scale (< 30 s)")
    args = p.parse_args(argv)
    args.ks = sorted({*args.ks, args.read_k, args.fkd_k})
    if args.quick:
        args.images, args.batches, args.imagenet_scale = min(args.images, 500), 10, False
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    res: dict = {"args": vars(args) | {"command": command_line()},
                 "machine": machine_info(), "assumed_consumption_img_per_s": ASSUMED_CONSUMPTION, "timings_s": {}}
    N, C, K = args.images, args.crops, args.classes
    clock = [time.perf_counter()]

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:5.0f} s] {msg}", file=sys.stderr, flush=True)

    def step(name: str) -> None:
        """Record how long the previous step took."""
        now = time.perf_counter()
        res["timings_s"][name] = round(now - clock[0], 2)
        clock[0] = now

    def sizes(path: Path, write_s: float) -> dict:
        du = disk_usage(path)
        return du | {"bytes_per_crop_apparent": du["apparent"] / (N * C),
                     "bytes_per_crop_allocated": du["allocated"] / (N * C),
                     "imagenet_gb": du["allocated"] / (N * C) * IMAGENET_TRAIN_IMAGES * C / 1e9, "write_s": write_s}

    def epoch_gathers(prefix: str, path: Path, digits: int) -> None:
        for w, local in ((1, True), (8, False), (8, True)):
            r = bench_epoch_gather(CountingReader(path), rng, B, w, restore_s, shard_local=local)
            read[f"{prefix}epoch gather, 1 of {w} ranks, {r['shares']} shares"] = r | {
                "note": f"{r['crops']:,} crops, {r['shard_decodes']} shard decodes, "
                        f"gather {r['epoch_gather_s']:.{digits}f} s"}

    with workdir(args, "bench_cache_") as work:
        say(f"generating {N:,} x {C} soft labels ...")
        data = generate(args, SoftLabelModel(K, args.seed))
        res["label_stats"], res["fidelity"] = data.pop("label_stats"), data.pop("fidelity")
        step("generate_and_fidelity")
        say(f"writing caches for k = {args.ks} ...")

        # 1. size per k
        res["storage"] = {}
        for k in args.ks:
            path = work / f"zarr_k{k}"
            res["storage"][str(k)] = sizes(path, write_cache(path, args, data, k)) | {"per_array_bytes_per_crop": {
                name: disk_usage(path / name)["apparent"] / (N * C) for name in ("boxes", "flip", "topk_index", "topk_prob")}}
        step("write_caches")
        say("timing reads ...")

        # 2. read rates (k = read_k)
        rng = np.random.default_rng(args.seed + 1)
        B, nb = args.batch, args.batches
        restore_s = restore_seconds_per_batch(data, args.read_k, K, B)
        res["restore_ms_per_batch"] = restore_s * 1e3
        read = res["read"] = {}
        S = -(-N // args.images_per_shard)
        path = work / f"zarr_k{args.read_k}"
        r = bench_random(CountingReader(path, max_cached_shards=S), rng, B, nb, prewarm=True)
        read["random, all shards resident"] = r | {"note": f"{S} shards, all in the LRU"}
        r = bench_random(CountingReader(path, max_cached_shards=1), rng, B, max(5, nb // 10), prewarm=False)
        read["random, LRU of 1 shard"] = r | {"note": f"{r['shard_decodes_per_batch']:.1f} shard decodes/batch"}
        r = bench_sequential(CountingReader(path, max_cached_shards=2), rng, B, N)
        read["sequential by shard"] = r | {"note": "each shard decoded once"}
        epoch_gathers("", path, 2)
        step("read_small")

        if args.imagenet_scale:
            # Same reads on an ImageNet-sized cache: random access then touches ~230 of
            # ~1,250 shards per batch, and an epoch gather decodes all of them, which a
            # 20-shard cache cannot show.
            big = work / "zarr_imagenet"
            say("writing an ImageNet-sized (tiled) cache ...")
            res["imagenet_cache_write_s"] = write_cache(big, args, data, args.read_k, IMAGENET_TRAIN_IMAGES)
            res["imagenet_cache_disk"] = disk_usage(big)
            step("write_imagenet_cache")
            say("timing reads on it ...")
            r = bench_random(CountingReader(big), rng, B, max(5, nb // 20), prewarm=False)
            read["ImageNet: random, default LRU (64 shards)"] = r | {
                "note": f"{r['num_shards']} shards, {r['shard_decodes_per_batch']:.0f} decodes/batch"}
            r = bench_random(CountingReader(big, max_cached_shards=10**6), rng, B, nb, prewarm=True)
            read["ImageNet: random, all shards resident"] = r | {"note": "whole cache decoded in RAM"}
            r = bench_sequential(CountingReader(big, max_cached_shards=2), rng, B, 200_000)
            read["ImageNet: sequential by shard"] = r | {"note": f"first {r['crops']:,} crops"}
            epoch_gathers("ImageNet: ", big, 1)
            if not args.keep:
                shutil.rmtree(big)
            step("read_imagenet")

        # 4. FKD-style per-image files, same data
        say("writing FKD-style files ...")
        fkd_root = work / "fkd"
        fkd = res["fkd"] = sizes(fkd_root, write_fkd(fkd_root, data, args.fkd_k))
        z = res["storage"][str(args.fkd_k)]
        fkd.update({
            "bytes_per_file_apparent": fkd["apparent"] / N,
            "bytes_per_file_allocated": fkd["allocated"] / N,
            "filesystem_block_size": os.statvfs(fkd_root).f_bsize,
            "size_ratio_apparent": fkd["apparent"] / z["apparent"],
            "size_ratio_allocated": fkd["allocated"] / z["allocated"],
            "random": bench_fkd_random(fkd_root, rng, N, C, K, B, max(5, nb // 10)),
        })
        step("fkd")
        res["total_s"] = time.perf_counter() - t_start
        res["machine"]["loadavg_at_end"] = os.getloadavg()  # other work on the machine skews the rates

        # Report before cleaning up: deleting tens of thousands of small files takes a while.
        print(report(res))
        print(f"\ntotal {res['total_s']:.0f} s (before cleanup); JSON: {write_results('cache', res, args.out, args.quick)}")
    return res


if __name__ == "__main__":
    main()
