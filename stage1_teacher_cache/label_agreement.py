"""How often the ensemble's top-1 on a crop agrees with the image's label: free, from arrays stage 1 has.

Where the soft labels contradict the hard label, they either correct a noisy
label or mislead the student; a low agreement on a student's own training
images is a warning sign before anyone pays for stage 2 (docs/teachers.md).

The figure is always *recomputed* from a cache's arrays and a manifest's
labels (:func:`cache_label_agreement`), never copied from another cache's
attributes, so growing, merging, subsetting or reducing a cache keeps it true.
Unlabelled images (label -1) are left out and counted. Shares are percentages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from common.cache_format import CacheReader, put_attrs, shard_bounds
from common.manifest import Manifest
from stage1_teacher_cache.teacher_eval import finite_number, unreadable_record


def crop_top1(topk_index: np.ndarray, topk_prob: np.ndarray) -> np.ndarray:
    """The class of each stored row's largest probability: [..., k] -> [...]."""
    best = np.asarray(topk_prob).argmax(axis=-1)[..., None]
    return np.take_along_axis(np.asarray(topk_index), best, axis=-1)[..., 0].astype(np.int64)


@dataclass
class AgreementCounts:
    """Per-class sums over labelled images, accumulated shard by shard."""

    crops: np.ndarray  # int64 [classes]: crops of images with this label
    agreeing: np.ndarray  # crops whose ensemble top-1 is the label
    images: np.ndarray  # labelled images
    mostly_disagreeing: np.ndarray  # images where more than half of the crops disagree
    unlabeled: int = 0

    @classmethod
    def zeros(cls, num_classes: int) -> "AgreementCounts":
        return cls(*(np.zeros(num_classes, np.int64) for _ in range(4)))

    def add(self, top1: np.ndarray, labels: np.ndarray) -> None:
        """``top1`` [n, C] ensemble top-1 per crop, ``labels`` [n] (-1 = unlabelled)."""
        labels = np.asarray(labels, dtype=np.int64)
        labelled = labels >= 0
        self.unlabeled += int((~labelled).sum())
        top1, labels = top1[labelled], labels[labelled]
        num_crops = top1.shape[1]
        agree_per_image = (top1 == labels[:, None]).sum(axis=1)
        n = len(self.crops)
        self.crops += np.bincount(labels, minlength=n) * num_crops
        self.agreeing += np.bincount(labels, weights=agree_per_image, minlength=n).astype(np.int64)
        self.images += np.bincount(labels, minlength=n)
        self.mostly_disagreeing += np.bincount(labels, weights=2 * (num_crops - agree_per_image) > num_crops,
                                               minlength=n).astype(np.int64)

    def summary(self) -> dict[str, Any]:
        """The JSON record a cache stores under ``label_agreement`` (percentages; None where nothing to count)."""
        def pct(part, whole) -> float | None:
            return round(100.0 * float(part) / float(whole), 4) if whole else None

        return {
            "crops_pct": pct(self.agreeing.sum(), self.crops.sum()),
            "images_mostly_disagreeing_pct": pct(self.mostly_disagreeing.sum(), self.images.sum()),
            "per_class_pct": [pct(a, c) for a, c in zip(self.agreeing, self.crops)],
            "labelled_images": int(self.images.sum()),
            "unlabeled_images": int(self.unlabeled),
        }


def shard_top1(reader: CacheReader) -> Iterator[tuple[slice, np.ndarray]]:
    """(image rows, ensemble top-1 per crop [rows, C]) for every shard of a complete cache, in order."""
    for shard in range(reader.layout.num_shards):
        start, stop = shard_bounds(shard, reader.layout.images_per_shard, reader.num_images)
        data = reader.read_shard(shard)
        yield slice(start, stop), crop_top1(data["topk_index"], data["topk_prob"])


def cache_label_agreement(reader: CacheReader, labels: np.ndarray) -> dict[str, Any]:
    """Agreement of a complete cache's crops with ``labels`` (the manifest's, image id order), shard by shard."""
    labels = np.asarray(labels)
    if len(labels) != reader.num_images:
        raise ValueError(f"{len(labels)} labels for a cache of {reader.num_images} images")
    counts = AgreementCounts.zeros(reader.num_classes)
    for rows, top1 in shard_top1(reader):
        counts.add(top1, labels[rows])
    return counts.summary()


def disagreeing_crops(reader: CacheReader, labels: np.ndarray) -> np.ndarray:
    """Per image, how many of its crops' ensemble top-1 differ from its label (0 for unlabelled images)."""
    labels = np.asarray(labels, dtype=np.int64)
    out = np.zeros(reader.num_images, np.int64)
    for rows, top1 in shard_top1(reader):
        out[rows] = np.where(labels[rows] >= 0, (top1 != labels[rows, None]).sum(axis=1), 0)
    return out


def record_label_agreement(path: str, manifest: Manifest) -> dict[str, Any]:
    """Recompute the complete cache's agreement with ``manifest``'s labels and store it in its attributes."""
    reader = CacheReader(path, manifest_hash=manifest.content_hash)
    agreement = cache_label_agreement(reader, manifest.labels)
    put_attrs(path, dict(reader.attrs, label_agreement=agreement))
    return agreement


REMEDY = "rerun teacher-cache on the cache with its manifest (it recomputes the figure)"


def read_label_agreement(record: Any, where: str = "label_agreement") -> dict[str, Any] | None:
    """A cache's ``label_agreement`` attribute, checked as ``read_teacher_eval`` checks ``teacher_eval``: a
    stranger's record whose figures are not as ``AgreementCounts.summary`` writes them raises CacheError naming
    ``where`` (file and attribute). None where nothing is recorded."""
    if not record:
        return None

    def percent(x: Any) -> bool:
        return finite_number(x) and 0.0 <= x <= 100.0

    def count(x: Any) -> bool:
        return type(x) is int and x >= 0

    if not isinstance(record, dict):
        raise unreadable_record(where, "(record)", record, REMEDY)
    # each figure may be absent or None (no labelled image), never of another kind
    checks = {"crops_pct": percent, "images_mostly_disagreeing_pct": percent, "labelled_images": count,
              "unlabeled_images": count,
              "per_class_pct": lambda x: isinstance(x, list) and all(p is None or percent(p) for p in x)}
    for key, ok in checks.items():
        if record.get(key) is not None and not ok(record[key]):
            raise unreadable_record(where, key, record[key], REMEDY)
    return record


def format_label_agreement(record: dict[str, Any] | None, class_names: list[str] | None = None) -> list[str]:
    """`cache info` lines: overall, the share of mostly-disagreeing images, the three least agreeing classes."""
    if not record or record.get("crops_pct") is None:
        return ["labels        agreement not recorded (no labelled images, or a cache made before it was recorded)"]
    line = (f"labels        ensemble top-1 = label on {record['crops_pct']:.2f}% of crops; most crops disagree "
            f"on {record['images_mostly_disagreeing_pct']:.2f}% of {record['labelled_images']:,} labelled images")
    if record.get("unlabeled_images"):
        line += f" ({record['unlabeled_images']:,} unlabelled left out)"
    per_class = [(p, i) for i, p in enumerate(record.get("per_class_pct") or []) if p is not None]
    worst = sorted(per_class)[:3]
    names = class_names or []
    lowest = ", ".join(f"{names[i] if i < len(names) else i} {p:.1f}%" for p, i in worst)
    return [line] + ([f"              lowest classes: {lowest}"] if len(per_class) > 1 else [])
