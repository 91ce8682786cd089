"""The ``teacher_eval`` record of a cache: built from stage 1's hit counts, shown by
`teacher-cache --evaluate-teachers`, `cache info` and `pipeline serve`, and judged here.

Plain numbers only (no torch, no timm), so reading a cache's record stays cheap. Accuracies are in
percent, like a student's ``val_top1``; records written before ``"unit": "percent"`` was stored hold
fractions and are converted by ``read_teacher_eval``, the one door every reader goes through.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Iterator, Sequence

import numpy as np

from common.errors import CacheError, shown


def summarize_hits(names: Sequence[str], hits: np.ndarray, num_images: int, num_classes: int,
                   manifest: dict[str, Any]) -> dict[str, Any]:
    """The ``teacher_eval`` record from the summed hit counts of ``hits_of_probs`` (layout there)."""
    acc = [{"top1": float(a[0]), "top5": float(a[1])} for a in 100 * np.asarray(hits) / num_images]
    T = len(names)
    scores = dict(zip(names, acc[:T]))
    best = max(names, key=lambda n: scores[n]["top1"])  # the first of equals, as listed
    return {
        "unit": UNIT,
        "manifest": manifest,
        "crop": "centre (each teacher's crop_pct)",
        "teachers": scores,
        "ensemble": acc[T],
        # the mean softmax of the other teachers; with two teachers, the other teacher alone
        "leave_one_out": dict(zip(names, acc[T + 1 :])) if T > 1 else {},
        "best_teacher": {"name": best, "top1": scores[best]["top1"]},
        "chance_top1": 100.0 / num_classes,
    }


UNIT = "percent"


def read_teacher_eval(record: dict[str, Any] | None, where: str = "teacher_eval") -> dict[str, Any] | None:
    """``record`` (a cache's ``teacher_eval`` attribute, or a copy kept in a results JSON) with its
    accuracies in percent: a record without ``"unit": "percent"`` was written when stage 1 stored fractions.

    A cache may be a stranger's: a record whose scores are not numbers in range raises CacheError naming
    ``where`` (the file and attribute), so every reader fails in one line instead of deep in a format call."""
    if not record:
        return None
    _check_scores(record, where)
    if record.get("unit") != UNIT:
        record = copy.deepcopy(dict(record, unit=UNIT))  # a converted copy: the caller's record stays as it was
        for _, table in _score_tables(record):  # each a dict with a figure: _check_scores said so
            table.update({key: 100 * table[key] for key in ("top1", "top5") if key in table})
        if record.get("chance_top1") is not None:
            record["chance_top1"] *= 100
    _check_range(record, where)
    return record


def _score_tables(record: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(key path, table) of every score table a record holds: ensemble, best_teacher, each teacher's, each
    leave-one-out's."""
    for key in ("ensemble", "best_teacher"):
        if record.get(key) is not None:
            yield key, record[key]
    for key in ("teachers", "leave_one_out"):
        tables = record.get(key)
        if isinstance(tables, dict):
            yield from ((f"{key}.{name}", table) for name, table in tables.items())
        elif tables is not None:
            yield key, tables  # not a table of tables: _check_scores names it


def finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def unreadable_record(where: str, key: str, value: Any,
                      remedy: str = "score the teachers again (teacher-cache --evaluate-teachers)") -> CacheError:
    """The one-line CacheError for a figure of a stored record (``where``: file and attribute) that is not as
    stage 1 writes it; ``remedy`` says how to get a true one."""
    return CacheError(f"{where}.{key}: {shown(value)} is not a figure as stage 1 writes it; this record was not "
                      f"written by this tool: {remedy}")


def _check_scores(record: Any, where: str) -> None:
    if not isinstance(record, dict):
        raise unreadable_record(where, "(record)", record)
    for key, table in _score_tables(record):
        if not isinstance(table, dict) or not finite_number(table.get("top1")) or (
                "top5" in table and not finite_number(table["top5"])):
            raise unreadable_record(where, key, table)
    if record.get("chance_top1") is not None and not finite_number(record["chance_top1"]):
        raise unreadable_record(where, "chance_top1", record["chance_top1"])
    if record.get("manifest") is not None and not isinstance(record["manifest"], dict):
        raise unreadable_record(where, "manifest", record["manifest"])


def _check_range(record: dict[str, Any], where: str) -> None:
    for key, table in _score_tables(record):
        for name in ("top1", "top5"):
            if name in table and not 0.0 <= table[name] <= 100.0:
                raise unreadable_record(where, f"{key}.{name}", table[name])


def format_eval_table(result: dict[str, Any]) -> str:
    """The per-teacher table; with several teachers, a column with the top-1 of the ensemble without each."""
    loo = result.get("leave_one_out") or {}
    rows = [*result["teachers"].items(), ("ensemble (mean softmax)", result["ensemble"])]
    width = max(len(name) for name, _ in rows) + 2
    head = f"{'teacher':<{width}}{'top-1':>8}{'top-5':>8}" + (f"{'ensemble without it':>22}" if loo else "")
    lines = [f"{head}   on {result['manifest']['num_images']} images"]
    lines += [f"{name:<{width}}{percent(r['top1']):>8}{percent(r['top5']):>8}"
              + (f"{percent(loo[name]['top1']):>22}" if name in loo else "") for name, r in rows]
    lines.append(f"{'chance':<{width}}{percent(result['chance_top1']):>8}")
    if len(result["teachers"]) > 1 and result.get("best_teacher"):
        lines.append(f"ensemble margin over the best single teacher ({result['best_teacher']['name']}): "
                     f"{points(result['ensemble']['top1'] - result['best_teacher']['top1'])}")
    return "\n".join(lines)


def ensemble_warnings(result: dict[str, Any]) -> list[str]:
    """Why this ensemble may teach worse than expected: each teacher whose removal raises the ensemble's
    top-1, and an ensemble that is not above its best single teacher. Empty for one teacher, or for a
    record made before leave-one-out figures were kept."""
    loo = result.get("leave_one_out") or {}
    best = result.get("best_teacher")
    if not loo or not best:
        return []
    ensemble = result["ensemble"]["top1"]
    warnings = [f"teacher {name} lowers the ensemble: without it {percent(r['top1'])}, with it {percent(ensemble)} top-1"
                for name, r in loo.items() if r["top1"] > ensemble]
    # with two teachers "A lowers it" already says "B alone is better"; more teachers can hide it
    if ensemble <= best["top1"] and not (warnings and len(loo) == 2):
        warnings.append(f"the ensemble ({percent(ensemble)} top-1) is not above its best single teacher "
                        f"{best['name']} ({percent(best['top1'])})")
    if warnings:
        warnings[-1] += ("; the student learns this ensemble: drop the weak teacher from --teachers or "
                         "train it longer (docs/teachers.md)")
    return warnings


# A student this close to its ensemble has learnt about all that the soft labels hold (measured: 87.17% from
# an 87.24% ensemble at full Fashion-MNIST, where hard labels gave 89.04%; docs/results.md).
CAUGHT_UP_POINTS = 0.5


def student_caught_up(student_top1: float, result: dict[str, Any] | None) -> str | None:
    """A note for the end of a distillation run whose student (``student_top1``, percent) is within
    CAUGHT_UP_POINTS of its teachers' ensemble, or above it, on the images that ``result`` (the cache's
    ``teacher_eval``) was measured on. The ensemble is then the limit of what distilling can give, and
    whether that beats hard labels depends on how far it is above a hard-label run of the same student
    (docs/teachers.md). None otherwise, or without a record."""
    if not result or "ensemble" not in result:
        return None
    ensemble = result["ensemble"]["top1"]
    if student_top1 < ensemble - CAUGHT_UP_POINTS:
        return None
    return (f"the student ({student_top1:.2f}% top-1) has caught up with its teachers' ensemble ({ensemble:.2f}% "
            f"on the same {result['manifest']['num_images']} images, from --evaluate-teachers): the ensemble is as "
            "far as its soft labels can take this student. MEAL V2 pays only when the ensemble is well above a "
            "hard-label run of the same student (the measured rule: docs/teachers.md, \"When distilling pays\"); "
            "if that run scores near or above "
            f"{ensemble:.2f}%, train stronger teachers or keep the hard labels (docs/teachers.md)")


def points(delta: float) -> str:
    """A difference of two percentages."""
    return f"{delta:+.2f} points"


def percent(value: float) -> str:
    return f"{value:.2f}%"
