"""The teacher cache's storage rules and the one builder of its attributes.

How soft labels are stored and restored: class indices as uint16 (int32 past
65,535 classes), probabilities as float16 rounded toward zero, and the mass the
top-k did not keep spread uniformly over the other classes when a dense target
is restored. The ``storage`` attribute records those rules, and every command
that writes a cache (stage 1, ``--more-crops``, ``cache merge``, ``subset``,
``reduce``, the benchmarks) builds its attributes with :func:`cache_attrs`.
The on-disk format (arrays, records, bounded reads, verify) is
common/cache_format.py.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Mapping

import numpy as np
import torch

from common.errors import CacheError  # noqa: F401  (the cache modules' error, raised here and re-exported)
from common.runtime import to_device

RESIDUAL_RULE = "uniform"
PROB_DTYPE = "float16"
MASS_TOLERANCE = 1e-2  # float16 top-k rounded down sums to <= 1; allow for other writers' rounding


# Describe the source's arrays only: a cache made from another recomputes them (label_agreement) or
# is no longer in that state (growing).
NOT_INHERITED = ("label_agreement", "growing")


def index_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint16) if num_classes <= 65535 else np.dtype(np.int32)


def round_down_fp16(prob) -> np.ndarray:
    """float16 probabilities rounded toward zero.

    Round-to-nearest can push the stored top-k mass to >= 1, which would leave
    no residual for the other classes; rounding down keeps sum(topk) <= the
    true mass, so restored targets give every class a share (when k < K).
    """
    prob = np.asarray(prob)
    if prob.dtype == np.float16:
        return prob
    p32 = prob.astype(np.float32)
    p16 = p32.astype(np.float16)
    over = p16.astype(np.float32) > p32
    p16[over] = np.nextafter(p16[over], np.float16(0))
    return p16


def restore_targets(topk_index, topk_prob, num_classes: int, device=None) -> torch.Tensor:
    """Dense (B, num_classes) float32 targets from stored top-k.

    The mass the top-k did not keep (1 - sum) is spread uniformly over the
    other classes (the cache's ``storage.residual = "uniform"``), so every row
    sums to 1 and no class gets zero probability unless k = num_classes.
    """
    idx = to_device(torch.from_numpy(np.asarray(topk_index).astype(np.int64)), device)
    prob = to_device(torch.from_numpy(np.asarray(topk_prob).astype(np.float32)), device).clamp_min_(0)
    k = idx.shape[-1]
    kept = prob.sum(-1, keepdim=True)
    if k < num_classes:
        residual = (1.0 - kept).clamp_min(0) / (num_classes - k)
        dense = residual.expand(*idx.shape[:-1], num_classes).clone()
    else:
        prob = prob / kept.clamp_min(1e-12)
        dense = torch.zeros(*idx.shape[:-1], num_classes, device=idx.device)
    dense.scatter_(-1, idx, prob)
    # fp16 rounding can leave the sum a hair off 1; KL wants an exact distribution.
    return dense / dense.sum(-1, keepdim=True)


def target_problems(topk_index: np.ndarray | None, topk_prob: np.ndarray | None, num_classes: int) -> list[str]:
    """What makes stored targets unusable for training, in one vectorised pass per array: NaN,
    infinite or negative probabilities, top-k mass above 1, class indices outside 0..classes-1.
    ``verify`` reports these; every shard read for training refuses them."""
    problems = []
    if topk_prob is not None:
        prob = np.asarray(topk_prob, dtype=np.float32)
        mass = prob.sum(-1)
        if not np.isfinite(mass).all() or (prob < 0).any() or (mass > 1.0 + MASS_TOLERANCE).any():
            problems.append("probability mass outside [0, 1] (NaN, infinite, negative or above 1)")
    if topk_index is not None:
        index = np.asarray(topk_index)
        if index.size and (index.max() >= num_classes or index.min() < 0):
            problems.append(f"class index outside 0..{num_classes - 1} (num_classes {num_classes})")
    return problems


def storage_attrs(k: int, images_per_shard: int, num_classes: int) -> dict[str, Any]:
    """The ``storage`` attribute: the rules above as a cache records them (part of its identity)."""
    return {"k": k, "images_per_shard": images_per_shard, "residual": RESIDUAL_RULE,
            "index_dtype": index_dtype(num_classes).name, "prob_dtype": PROB_DTYPE}


def check_residual(attrs: Mapping[str, Any], path: str, command: str) -> None:
    """Refuse a source whose targets ``command`` would restore with a rule they were not stored for."""
    rule = attrs["storage"].get("residual")
    if rule != RESIDUAL_RULE:
        raise CacheError(f"{path}: residual rule {rule!r}; {command} knows only the {RESIDUAL_RULE!r} rule")


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def cache_attrs(source: Mapping[str, Any] | None = None, *, manifest: dict | None = None,
                num_classes: int | None = None, teachers: list | None = None, ensemble: dict | None = None,
                crops: dict | None = None, num_crops: int | None = None, k: int | None = None,
                images_per_shard: int | None = None, stamp_created: bool = True, **described: Any) -> dict[str, Any]:
    """The attributes of a new cache: built from its inputs (``source`` None: stage 1, merge), or
    from the cache ``source`` it is made of (subset, reduce, grow), less NOT_INHERITED.

    The identity parts (manifest, num_classes, teachers, ensemble, crops, and ``storage`` from k,
    images_per_shard and the class count) come first; ``num_crops`` or ``k`` change a source's;
    ``described`` holds the rest (paths, evaluation, config, provenance such as merge, subset,
    reduced, grown, crops_from), in the order given. ``created_at`` is stamped now unless
    ``stamp_created`` is False (a grown cache keeps its creation time). Returned as it reads back
    from JSON (tuples become lists), so the writer's identity check compares like with like.
    """
    attrs = {key: value for key, value in (source or {}).items() if key not in NOT_INHERITED}
    given = {"manifest": manifest, "num_classes": num_classes, "teachers": teachers, "ensemble": ensemble,
             "crops": crops}
    for key, value in given.items():
        if value is not None:
            attrs[key] = value
        elif key not in attrs:
            raise TypeError(f"cache_attrs: {key!r} is needed for a cache built from inputs")
    if num_crops is not None:
        attrs["crops"] = dict(attrs["crops"], num_crops=num_crops)
    if "storage" not in attrs or k is not None or images_per_shard is not None:
        stored = attrs.get("storage", {})
        attrs["storage"] = storage_attrs(stored["k"] if k is None else k,
                                         stored["images_per_shard"] if images_per_shard is None else images_per_shard,
                                         attrs["num_classes"])
    attrs.update(described)
    if stamp_created:
        attrs["created_at"] = now_utc()
    return json.loads(json.dumps(attrs))
