"""Will distilling beat the labels? The measured rule, applied to the figures a user has before stage 2.

The rule comes from the accuracy grid (benchmarks/bench_distill_regimes.py; docs/teachers.md, "When
distilling pays"): Fashion-MNIST regimes, each with a hard-label, a cached MEAL V2 and an online MEAL V2
student trained for the same epochs. Its inputs are figures known before stage 2:

* ``ensemble``: the teachers' ensemble top-1 on the validation images (``teacher-cache --evaluate-teachers``);
* ``agreement``: how often the ensemble's top-1 on a cached crop is the image's label (the cache's
  ``label_agreement``, computed by stage 1);
* ``short_hard``: the top-1 of a *short* hard-label run of the student: E/4 epochs of the same recipe
  (``pipeline train --epochs E/4``), given as ``distill.hard_label_top1`` (``--hard-label-top1``).

The grid searched rules on the relative figures only (points above the short run): a threshold on the
ensemble's absolute top-1 separates Fashion-MNIST's regimes but means nothing on another dataset.
The rule and ``advise`` are plain numbers, so stage 1 and stage 2 print the same advice; a cache's figures
are read through stage 1's checked doors (``read_teacher_eval``, ``read_label_agreement``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

SHORT_RUN_DIVISOR = 4  # the short run is E / 4 epochs of the distillation's own recipe (at least 1)
# A cached crop came back up to this many times (E * m / C) at no measurable cost against fresh crops: the grid's
# item 5 (C = E/8 at E = 40 and 60 on 500 and 1,000 images) and the crop budget study (C = 1 at E = 8 on 60,000).
MEASURED_REPLAYS = 8

# The figures a rule may use: the relative ones carry across datasets; the absolute ones only rank regimes
# of one dataset (the grid's report shows the best rule on them too, for comparison).
RELATIVE_FEATURES = ("margin", "agreement_margin")
ALL_FEATURES = ("ensemble", "agreement", "short_hard", "margin", "agreement_margin")


@dataclass(frozen=True)
class Condition:
    """``feature > threshold`` (``above``) or ``feature <= threshold``."""

    feature: str
    threshold: float
    above: bool

    def holds(self, x: float) -> bool:
        return x > self.threshold if self.above else x <= self.threshold

    def __str__(self) -> str:
        return f"{self.feature} {'>' if self.above else '<='} {self.threshold:.2f}"


@dataclass(frozen=True)
class Rule:
    """Predicts a gain (MEAL V2 above hard labels) where ``op`` ("and" / "or") of its conditions holds."""

    conditions: tuple[Condition, ...]
    op: str = "and"
    accuracy: float = 0.0  # on the regimes it was derived from
    margin: float = 0.0  # the smallest distance of a regime's figure from a threshold, over the figure's range

    def predicts_gain(self, features: Mapping[str, float]) -> bool:
        hits = [c.holds(features[c.feature]) for c in self.conditions]
        return all(hits) if self.op == "and" else any(hits)

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.feature for c in self.conditions))

    def __str__(self) -> str:
        return "distil when " + f" {self.op} ".join(str(c) for c in self.conditions)


# The rule the grid derived on its training regimes (benchmarks/results/distill_regimes.md has the search,
# every regime's call and the held-out check). Update it with MEASURED_ON when the grid is rerun.
# Right on all 8 training regimes with a clear outcome (|cached - hard| >= 1 point; 5 were ties) and on 6 of the 7
# held out: the miss is a pair whose weak teacher lowers the ensemble, which --evaluate-teachers names anyway.
MEASURED_RULE = Rule((Condition("margin", 9.26, above=True),), accuracy=1.0)
MEASURED_ON = "20 Fashion-MNIST regimes, 6 of 7 held out called right"


def features_of(ensemble: float | None, agreement: float | None, short_hard: float | None) -> dict[str, float | None]:
    """Every figure a rule may use (percent and points), None where an input is missing."""
    def minus(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    return {"ensemble": ensemble, "agreement": agreement, "short_hard": short_hard,
            "margin": minus(ensemble, short_hard), "agreement_margin": minus(agreement, short_hard)}


@dataclass(frozen=True)
class Advice:
    """``verdict``: "gain" (the rule expects MEAL V2 to beat hard labels), "loss", or "unknown" (a figure is
    missing; ``missing`` names it). ``lines``: what to print, the first starting with "warning:" or "note:"
    (none for a gain)."""

    verdict: str
    features: dict[str, float | None]
    missing: tuple[str, ...]
    lines: tuple[str, ...]


def short_epochs(epochs: int) -> int:
    return max(1, epochs // SHORT_RUN_DIVISOR)


def advise(ensemble: float | None, agreement: float | None, short_hard: float | None, epochs: int,
           rule: Rule = MEASURED_RULE, where: str = "") -> Advice:
    """The rule's call on these figures (percent; None where unknown, and a ``short_hard`` of 0:
    ``distill.hard_label_top1``'s "not measured"), with what to print.

    ``epochs``: the distillation's E (the short run is ``short_epochs(E)``); ``where``: the images the
    ensemble was scored on, for the message ("on 10000 images of val.parquet").
    """
    short_hard = short_hard or None
    f = features_of(ensemble, agreement, short_hard)
    sources = {"ensemble": "the ensemble's top-1 (teacher-cache --evaluate-teachers VAL_MANIFEST)",
               "agreement": "the cache's label agreement (stage 1 computes it where images are labelled)",
               "short_hard": (f"the top-1 of a short hard-label run of the student: `pipeline train --epochs "
                              f"{short_epochs(epochs)}` (E/{SHORT_RUN_DIVISOR}) with this recipe, passed as "
                              "--hard-label-top1 (distill.hard_label_top1)")}
    needed = {"margin": ("ensemble", "short_hard"), "agreement_margin": ("agreement", "short_hard")}
    missing = tuple(dict.fromkeys(m for name in rule.features for m in needed.get(name, (name,)) if f[m] is None))
    if missing:
        return Advice("unknown", f, missing, (
            "note: to check whether distilling will beat hard labels (the measured rule, docs/teachers.md "
            f"\"When distilling pays\": {rule}), give " + "; and ".join(sources[m] for m in missing),))
    gain = rule.predicts_gain(f)
    if gain:
        return Advice("gain", f, (), ())
    figures = [f"ensemble {ensemble:.2f}%{f' {where}' if where else ''}" if ensemble is not None else None,
               f"short hard-label run {short_hard:.2f}% ({short_epochs(epochs)} of {epochs} epochs)"
               if short_hard is not None else None,
               f"margin {f['margin']:+.2f} points" if f["margin"] is not None else None,
               f"label agreement {agreement:.2f}% of crops" if agreement is not None else None]
    return Advice("loss", f, (), (
        f"warning: distilling is not expected to beat hard labels here: {'; '.join(x for x in figures if x)}. "
        f"The measured rule ({MEASURED_ON}) is \"{rule}\"; regimes below it lost to hard labels "
        "(docs/teachers.md \"When distilling pays\").",
        "  what to do: keep the hard labels (`pipeline train`), or make the teachers clearly better than the "
        "student (train them longer or on more images; drop a teacher that lowers the ensemble), then check again",
    ))


def scored_on(evaluation: Mapping[str, Any] | None) -> str:
    """Where a ``teacher_eval`` record's ensemble was scored, for the message ("on 10000 evaluation images")."""
    images = ((evaluation or {}).get("manifest") or {}).get("num_images")
    return f"on {images} evaluation images" if images else ""


def advise_from_cache(attrs: Mapping[str, Any], short_hard: float | None, epochs: int,
                      where: str = "the cache") -> Advice:
    """``advise`` on a cache's own figures: its ``teacher_eval`` (ensemble top-1) and ``label_agreement``, both
    read through their checked doors, so a stranger's forged figure raises CacheError naming ``where``."""
    from stage1_teacher_cache.label_agreement import read_label_agreement
    from stage1_teacher_cache.teacher_eval import read_teacher_eval

    evaluation = read_teacher_eval(attrs.get("teacher_eval"), f"{where}: zarr.json: teacher_eval")
    agreement = read_label_agreement(attrs.get("label_agreement"), f"{where}: zarr.json: label_agreement")
    return advise((evaluation or {}).get("ensemble", {}).get("top1"), (agreement or {}).get("crops_pct"),
                  short_hard, epochs, where=scored_on(evaluation))


def crop_replays(epochs: int, crops_per_image: int, num_crops: int) -> float:
    """How many times a run of ``epochs`` epochs taking ``crops_per_image`` crops per image per step meets each
    of a cache's ``num_crops`` crops."""
    return epochs * crops_per_image / num_crops


def distill_start_lines(attrs: Mapping[str, Any], short_hard: float | None, epochs: int, crops_per_image: int,
                        num_crops: int, where: str = "the cache") -> list[str]:
    """What `distill` prints at start from its cache: the rule's warning where the figures are there and it
    expects a loss (no note where one is missing: stage 1 says how to get it, and a note on every run would only
    hide real messages), and a note where each crop comes back more often than was measured."""
    advice = advise_from_cache(attrs, short_hard, epochs, where)
    lines = list(advice.lines) if advice.verdict == "loss" else []
    replays = crop_replays(epochs, crops_per_image, num_crops)
    if replays > MEASURED_REPLAYS:
        lines.append(f"note: each cached crop comes back {replays:.0f} times ({epochs} epochs x {crops_per_image} "
                     f"crops per image / C = {num_crops}); no loss against fresh crops was measured up to "
                     f"{MEASURED_REPLAYS} (docs/teachers.md, \"Crops against epochs\"). Beyond it is unmeasured: "
                     f"`teacher-cache --more-crops N` grows the cache to C >= {math.ceil(epochs * crops_per_image / MEASURED_REPLAYS)}")
    return lines
