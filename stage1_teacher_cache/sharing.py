"""`pipeline cache merge`, `cache subset` and `cache reduce`: new caches made from existing ones.

All three write through :class:`CacheWriter`, shard by shard, so they are resumable
(rerun the same command) and their output is an ordinary cache: `cache verify`
checks it and `pipeline distill` reads it. Sources are read with their shard
checksums verified, so damage is refused rather than copied.

**Merge.** MEAL V2's target is the mean of the teachers' softmaxes. Caches of
disjoint teacher sets built on the same manifest and the same crops combine
into the cache of the union: restore each source's dense target from its
top-k (residual spread uniformly, as every reader does), take the mean
weighted by each source's number of teachers, keep the top-k again. The
restoration is where precision is lost; docs/cache-format.md ("Merging")
measures how much.

**Subset.** Image ids are dense positions in a manifest, so a cache of some of
the images needs a manifest of exactly those images: subset writes both, the
manifest first (its content hash goes into the cache's attributes).

**Reduce.** A smaller k for a team that needs fewer bytes: the k most probable
of each crop's stored classes, with the same float16 values, which is what
stage 1 would have stored with that k (same crops, same rounding), so no
teacher has to run again. The residual grows by the dropped classes' mass.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch

from common.cache_format import CacheError, CacheReader, CacheWriter
from common.cache_storage import cache_attrs, check_residual, index_dtype, restore_targets
from common.locations import absolute
from common.manifest import Manifest, ManifestRow, load_manifest, write_manifest
from stage1_teacher_cache.label_agreement import record_label_agreement

# Dense rows restored at once while merging: bounds memory to ~64 MB per source whatever the class count.
_MERGE_BLOCK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------------------------- merge


def merge_caches(sources: Sequence[str], out: str, topk: int | None = None,
                 manifest_path: str | None = None) -> dict[str, Any]:
    """Average the caches ``sources`` into ``out``; returns a summary. With ``manifest_path`` (the manifest
    the caches were built from) the merged ensemble's agreement with the labels is recorded."""
    if len(sources) < 2:
        raise CacheError("merge needs at least two caches")
    readers = [CacheReader(s, verify_checksums=True) for s in sources]
    check_mergeable(readers)
    check_same_crops(readers)
    num_classes = readers[0].num_classes
    k = min(r.topk for r in readers) if topk is None else topk
    if not 1 <= k <= num_classes:
        raise CacheError(f"--topk {k}: must be between 1 and the {num_classes} classes")

    weights = np.array([len(r.attrs["teachers"]) for r in readers], dtype=np.float64)
    weights /= weights.sum()
    writer = CacheWriter(out, merged_attrs(readers, weights, k))

    def merged(start: int, stop: int) -> dict[str, np.ndarray]:
        parts = [r.images(np.arange(start, stop)) for r in readers]
        index, prob = merge_targets(parts, weights, num_classes, k)
        return dict(parts[0], topk_index=index, topk_prob=prob)  # the crops are every source's (check_same_crops)

    return {"cache": out, "sources": list(sources), "k": k, "weights": weights.tolist(),
            "teachers": [t["name"] for t in writer.attrs["teachers"]], **_fill(writer, merged, manifest_path)}


def _fill(writer: CacheWriter, rows_of: Callable[[int, int], dict[str, np.ndarray]],
          manifest_path: str | None) -> dict[str, Any]:
    """Write ``writer``'s incomplete shards from ``rows_of(start, stop)`` (arrays as ``CacheReader.images`` returns);
    with a manifest, record the label agreement from the new arrays (never a source's: its top-1s may differ)."""
    complete = writer.complete_shards()
    todo = [s for s in range(len(complete)) if not complete[s]]
    for shard in todo:
        rows = rows_of(*writer.shard_range(shard))
        writer.write_shard(shard, rows["boxes"], rows["flip"], rows["topk_index"], rows["topk_prob"])
    agreement = record_label_agreement(writer.path, load_manifest(manifest_path)) if manifest_path else None
    return {"shards_written": len(todo), "shards_total": len(complete), "label_agreement": agreement}


def check_mergeable(readers: Sequence[CacheReader]) -> None:
    """Refuse sources that do not describe the same images, crops and label space, naming the difference."""
    first = readers[0]
    for other in readers[1:]:
        diffs = [f"{key}: {first.path} has {_short(first.attrs.get(key))}, {other.path} has {_short(other.attrs.get(key))}"
                 for key in ("manifest", "num_classes", "class_names", "crops", "ensemble")
                 if first.attrs.get(key) != other.attrs.get(key)]
        if diffs:
            raise CacheError("refusing to merge caches built on different inputs:\n  - " + "\n  - ".join(diffs))
    for r in readers:
        check_residual(r.attrs, r.path, "merge")
    seen: dict[str, str] = {}
    for r in readers:
        for t in r.attrs["teachers"]:
            if t["name"] in seen:
                raise CacheError(
                    f"teacher {t['name']} is in both {seen[t['name']]} and {r.path}: averaging it twice would "
                    "double its weight (and teacher names must be unique in a cache)"
                )
            seen[t["name"]] = r.path


def check_same_crops(readers: Sequence[CacheReader]) -> None:
    """The stored boxes are authoritative: equal crop attributes are not enough, the arrays must match.

    Read before anything is written, so a refused merge leaves no partial output.
    """
    first = readers[0]
    step = first.layout.images_per_shard
    for start in range(0, first.num_images, step):
        ids = np.arange(start, min(start + step, first.num_images))
        ref = {name: np.asarray(first.arrays[name][ids[0] : ids[-1] + 1]) for name in ("boxes", "flip")}
        for other in readers[1:]:
            for name in ("boxes", "flip"):
                got = np.asarray(other.arrays[name][ids[0] : ids[-1] + 1])
                if not np.array_equal(got, ref[name]):
                    image = start + int(np.argwhere(got != ref[name])[0][0])
                    raise CacheError(
                        f"refusing to merge: crops differ ({name} of image {image}: {first.path} has "
                        f"{ref[name][image - start].tolist()}, {other.path} has {got[image - start].tolist()}); "
                        f"build one cache with `pipeline teacher-cache --reuse-crops` of the other"
                    )


def merge_targets(parts: Sequence[dict[str, np.ndarray]], weights: np.ndarray, num_classes: int,
                  k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of the weighted mean of the sources' restored dense targets: ([n, C, k], [n, C, k]).

    The probabilities stay float32: ``CacheWriter.write_shard`` rounds them to
    float16 *downwards*, which a float16 array here would pre-empt by rounding to
    nearest (and a confident row's top-k could then sum to 1, leaving no residual).
    """
    shape = parts[0]["topk_index"].shape[:-1]
    flat = [(p["topk_index"].reshape(-1, p["topk_index"].shape[-1]),
             p["topk_prob"].reshape(-1, p["topk_prob"].shape[-1])) for p in parts]
    rows = flat[0][0].shape[0]
    block = max(1, _MERGE_BLOCK_ELEMENTS // num_classes)
    index = np.empty((rows, k), index_dtype(num_classes))
    prob = np.empty((rows, k), np.float32)
    for lo in range(0, rows, block):
        hi = min(lo + block, rows)
        mean = sum(float(w) * restore_targets(i[lo:hi], p[lo:hi], num_classes) for w, (i, p) in zip(weights, flat))
        top = torch.topk(mean, k, dim=-1)
        index[lo:hi] = top.indices.numpy()
        prob[lo:hi] = top.values.numpy()
    return index.reshape(*shape, k), prob.reshape(*shape, k)


def merged_attrs(readers: Sequence[CacheReader], weights: np.ndarray, k: int) -> dict[str, Any]:
    first = readers[0].attrs
    files = {name: path for r in readers for name, path in (r.attrs.get("teacher_files") or {}).items()}
    return cache_attrs(
        manifest=first["manifest"],
        num_classes=int(first["num_classes"]),
        teachers=[t for r in readers for t in r.attrs["teachers"]],
        ensemble=first["ensemble"],
        crops=first["crops"],
        k=k,
        images_per_shard=int(first["storage"]["images_per_shard"]),
        # not identity:
        manifest_path=first.get("manifest_path"),
        class_names=first.get("class_names"),
        teacher_files=files,
        teacher_eval=None,  # each source's evaluation is kept in its merge record
        merge={
            "rule": "teacher-weighted mean of the dense targets restored from each source's top-k "
                    "(uniform residual), then top-k",
            "k": k,
            "sources": [
                {"path": r.path, "k": r.topk, "weight": float(w), "teachers": [t["name"] for t in r.attrs["teachers"]],
                 "created_at": r.attrs.get("created_at"), "compute": r.attrs.get("compute"),
                 "teacher_eval": r.attrs.get("teacher_eval")}
                for r, w in zip(readers, weights)
            ],
        },
    )


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------- subset


def subset_cache(cache: str, out: str, manifest_path: str, subset_manifest_out: str,
                 classes: Sequence[str] | None = None, image_ids: str | None = None) -> dict[str, Any]:
    """Write the manifest of the selected images, then the cache of their rows; returns a summary."""
    if (classes is None) == (image_ids is None):
        raise CacheError("give exactly one of --classes or --image-ids")
    manifest = load_manifest(manifest_path)
    reader = CacheReader(cache, manifest_hash=manifest.content_hash, verify_checksums=True)
    if classes is not None:
        ids, selection = select_classes(manifest, classes), {"classes": list(classes)}
    else:
        ids, selection = parse_image_ids(image_ids, manifest.num_images), _id_spec_record(image_ids)
    if not len(ids):
        raise CacheError(f"the selection {selection} matches no image of {manifest_path}")

    description = f"{manifest.description} " if manifest.description else ""
    description += f"(subset of {manifest.content_hash[:16]}...: {json.dumps(selection)})"
    new_hash = write_manifest(subset_rows(manifest, ids), manifest.class_names, manifest.root, subset_manifest_out,
                              description=description)
    writer = CacheWriter(out, cache_attrs(
        reader.attrs,
        manifest={"hash": new_hash, "num_images": len(ids)},
        manifest_path=absolute(subset_manifest_out),
        subset={
            "source": reader.path,
            "source_manifest": reader.attrs["manifest"],
            "selection": selection,
            "num_images": len(ids),
            # the list itself could be millions of ids: a digest keeps the attributes small
            "image_ids_sha256": hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest(),
        },
    ))
    return {"cache": out, "manifest": subset_manifest_out, "manifest_hash": new_hash, "images": len(ids),
            **_fill(writer, lambda start, stop: reader.images(ids[start:stop]), subset_manifest_out)}


def select_classes(manifest: Manifest, names: Sequence[str]) -> np.ndarray:
    """Ids of the images labelled with any of ``names`` (ascending)."""
    unknown = [n for n in names if n not in manifest.class_names]
    if unknown:
        known = ", ".join(manifest.class_names[:20]) + (" ..." if manifest.num_classes > 20 else "")
        raise CacheError(f"--classes: {unknown} not among the manifest's classes ({known})")
    wanted = [manifest.class_names.index(n) for n in names]
    return np.flatnonzero(np.isin(manifest.labels, wanted)).astype(np.int64)


def parse_image_ids(spec: str, num_images: int) -> np.ndarray:
    """Ids from a file (integers separated by whitespace or commas, ``#`` comments) or a list of
    ``START:STOP`` ranges (STOP excluded) and single ids, e.g. ``0:100,250``. Sorted ascending."""
    path = Path(spec)
    text = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines()) if path.is_file() else spec
    ids: list[np.ndarray] = []
    for token in text.replace(",", " ").split():
        start, sep, stop = token.partition(":")
        try:
            ids.append(np.arange(int(start), int(stop)) if sep else np.array([int(token)]))
        except ValueError:
            raise CacheError(f"--image-ids: {token!r} is neither an id nor a START:STOP range") from None
    chosen = np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64)
    if chosen.size and (chosen.min() < 0 or chosen.max() >= num_images):
        raise CacheError(f"--image-ids: ids must be in 0..{num_images - 1}")
    unique = np.unique(chosen)
    if len(unique) != len(chosen):
        raise CacheError("--image-ids: an id is listed twice")
    return unique


def subset_rows(manifest: Manifest, ids: np.ndarray) -> list[ManifestRow]:
    digests = _sha256_column(manifest)
    return [ManifestRow(manifest.paths[i], int(manifest.labels[i]), int(manifest.widths[i]),
                        int(manifest.heights[i]), int(manifest.file_bytes[i]), digests[i]) for i in ids]


def _sha256_column(manifest: Manifest) -> list[str]:
    """The per-image digests, which Manifest does not keep; the file was verified by load_manifest."""
    table = pq.read_table(manifest.path, columns=["image_id", "sha256"])
    order = np.argsort(table.column("image_id").to_numpy(), kind="stable")
    digests = table.column("sha256").to_pylist()
    return [digests[i] for i in order]


def _id_spec_record(spec: str) -> dict[str, Any]:
    path = Path(spec)
    if path.is_file():
        return {"image_ids_file": str(path.absolute()), "file_sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {"image_ids": spec}


# --------------------------------------------------------------------------------------------- reduce


def reduce_topk(cache: str, out: str, topk: int, manifest_path: str | None = None) -> dict[str, Any]:
    """Write ``out``: ``cache`` with each crop's ``topk`` most probable stored classes; returns a summary.
    With ``manifest_path`` the agreement with the labels is recomputed and recorded."""
    reader = CacheReader(cache, verify_checksums=True)
    if not 1 <= topk < reader.topk:
        raise CacheError(f"--topk {topk}: must be between 1 and {reader.topk - 1} ({cache} keeps k = {reader.topk}; "
                         "a larger k cannot be recovered from it: rerun `pipeline teacher-cache --reuse-crops`)")
    check_residual(reader.attrs, cache, "reduce")
    writer = CacheWriter(out, cache_attrs(reader.attrs, k=topk,
                                          reduced={"source": reader.path, "source_k": reader.topk, "k": topk}))

    def reduced(start: int, stop: int) -> dict[str, np.ndarray]:
        rows = reader.images(np.arange(start, stop))
        # most probable first whatever order the source kept (stable: ties keep their stored order)
        order = np.argsort(-rows["topk_prob"].astype(np.float32), axis=-1, kind="stable")[..., :topk]
        return dict(rows, topk_index=np.take_along_axis(rows["topk_index"], order, -1),
                    topk_prob=np.take_along_axis(rows["topk_prob"], order, -1))

    return {"cache": out, "source": reader.path, "source_k": reader.topk, "k": topk,
            **_fill(writer, reduced, manifest_path)}
