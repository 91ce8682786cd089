"""The accuracy grid (issue 25): in which regimes does distilling beat the labels, and with how many crops?

The grid (Fashion-MNIST regimes, each with a ``hard``-label, a ``cached`` MEAL V2 (C = E/4) and an ``online``
MEAL V2 student of ``test_efficientnet`` at the demo's recipe, trained for the same E epochs; seed 1 of all
three where |cached - hard| < 1 point) and the rule it gives: docs/teachers.md, "The rule, measured". The
figures a user has before stage 2 (``ensemble``, ``agreement``, ``short_hard`` and the margins of the two
first above the last) are stage1_teacher_cache/distill_advice.py's, recorded per regime. ``search_rule``
derives the rule on the training regimes, ``evaluate_rule`` checks it on the held-out ones, and the report
lists every call, the points a user gives away, two comparisons (every figure; every gain > 0 counted) and
whether the library's MEASURED_RULE matches. Also measured:

* item 3: ``distill.label_weight`` w in {0.25, 1} (w = 0 is the cached run itself) on the training regime
  that lost most, the one that gained most and the one that lost most with a positive margin, chosen after
  their runs;
* item 4 (MEAL V2's own structure): a student trained on hard labels on all 60,000 images (``pre``), then
  continued for the same epochs and lr schedule on hard labels, from the cache and online, from its
  best.pt (``train.weights`` / ``distill.student_weights``), teachers clearly above it, 2 seeds;
* item 5 (crops against epochs): on regimes short of data with E = 40-60, cached C in {E/8, E/4, E/2, E}
  against online fresh crops, 2 seeds.

Every step goes through the library's experiment driver (stage2_student_distill/experiment.py), and is
recorded once finished as WORKDIR/steps/KEY.json (KEY as ``Step.key``: ``hard:n1000-mid-e40:seed0``,
``cache:n1000-mid-e40:C10``, ``teacher:test_resnet-e3-n30000-s30000``, ...). A rerun of the same command
skips finished steps and resumes an interrupted training run from its last.pt; ``--jobs 2`` runs
independent steps two at a time (``run_steps``). ``--plan`` prints every step with its estimated minutes.

    python -m benchmarks.bench_distill_regimes --plan                   # the steps and their cost
    nohup python -m benchmarks.bench_distill_regimes --jobs 2 > runs/distill-regimes.log 2>&1 &
    python -m benchmarks.bench_distill_regimes --smoke --source DIR      # every step kind, tiny, minutes

Writes the JSON (``--out``, default benchmarks/results/distill_regimes.json), a markdown report
(``--report``, default benchmarks/results/distill_regimes.md) and the plot of gain against the rule's
feature (``--plot``, default docs/img/distill_regimes.png); ``--smoke`` writes them under WORKDIR.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from benchmarks.harness import (
    REPO, begin, demo_parser, figure, machine_line, run_header, run_main, run_steps, say, update_marked_section,
    write_results,
)
from common.atomic import atomic_write_json
from stage1_teacher_cache.distill_advice import (
    ALL_FEATURES, MEASURED_RULE, RELATIVE_FEATURES, Condition, Rule, features_of, short_epochs,
)
from stage2_student_distill import experiment as ex

STUDENT = "test_efficientnet"
LABEL_WEIGHTS = (0.25, 1.0)  # item 3's w besides 0 (the cached run itself)


# --------------------------------------------------------------------------- the grid as data


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher: ``arch`` trained on hard labels for ``epochs`` on ``images`` class-balanced training images
    after the first ``skip`` (skip >= the students' N: images other than theirs; 0: theirs and more), or the
    given ``weights`` (a `pipeline train` checkpoint, not trained again)."""

    arch: str
    epochs: int
    images: int
    skip: int = 0
    weights: str = ""

    @property
    def name(self) -> str:
        return f"{self.arch}-given" if self.weights else f"{self.arch}-e{self.epochs}-n{self.images}-s{self.skip}"


@dataclass(frozen=True)
class Regime:
    """Students on the first ``images`` class-balanced training images for ``epochs``, taught by ``teachers``.

    ``budgets``: item 5's further cache sizes C (2 seeds); ``pretrain``: item 4, every student continues from
    a hard-label student trained ``epochs`` on the same images (2 seeds); ``held_out``: kept out of the
    rule's derivation and used to check it.
    """

    name: str
    images: int
    teachers: tuple[TeacherSpec, ...]
    epochs: int
    held_out: bool = False
    budgets: tuple[int, ...] = ()
    pretrain: bool = False
    num_crops: int = 0  # C of the main cache; 0: E/4 (docs/teachers.md's rule, at least 1)

    @property
    def C(self) -> int:
        return self.num_crops or max(1, self.epochs // 4)

    @property
    def always_two_seeds(self) -> bool:
        return bool(self.budgets) or self.pretrain

    def describe(self) -> str:
        taught = " + ".join(
            f"{t.arch} (given)" if t.weights else
            f"{t.arch} {t.epochs} ep on {t.images:,} {'other' if t.skip >= self.images else 'incl. own'} images"
            for t in self.teachers)
        return f"{self.images:,} images, {self.epochs} epochs, teachers {taught}"


STEP_KINDS = ("teacher", "pre", "short", "hard", "cache", "cached", "online")


@dataclass(frozen=True)
class Step:
    """One unit of work, its key in WORKDIR/steps/: ``KIND:NAME[:seedS][:CN][:wW]`` (NAME: a regime's, or a
    teacher's ``TeacherSpec.name``). ``C`` None: the regime's main cache; ``w`` None: no label weight."""

    kind: str
    name: str
    seed: int | None = None
    C: int | None = None
    w: float | None = None

    @property
    def key(self) -> str:
        tags = (("seed", self.seed), ("C", self.C), ("w", None if self.w is None else f"{self.w:g}"))
        return ":".join([self.kind, self.name, *(f"{tag}{value}" for tag, value in tags if value is not None)])

    @classmethod
    def parse(cls, key: str) -> "Step":
        kind, name, *tags = key.split(":")
        if kind not in STEP_KINDS or not name:
            raise ValueError(f"step key {key!r}: kind must be one of {STEP_KINDS}, then a name")
        fields: dict[str, Any] = {}
        for tag in tags:
            for field, convert in (("seed", int), ("C", int), ("w", float)):
                if tag.startswith(field) and field not in fields:
                    fields[field] = convert(tag[len(field):])
                    break
            else:
                raise ValueError(f"step key {key!r}: unknown part {tag!r}")
        return cls(kind, name, **fields)


# The strong teacher of item 4: resnet10t, 22 epochs on all 60,000 images at 28 px, 92.12% (the crop budget
# study's warm restart); the student plateaus near 89-90% there. Weights are not kept in git: regenerate it
# with the commands in docs/results.md ("A teacher trained longer"), or take it from the commit that still
# held it: git show 8ff9461:benchmarks/results/crop_budget_t22_state/teacher_resnet10t/best.pt > PATH
STRONG_TEACHER = "runs/teachers/resnet10t_e22/best.pt"
OTHERS = 30000  # disjoint teachers learn from training images after the first 30,000 (3,000 a class)


def crop_budgets(epochs: int) -> tuple[int, ...]:
    """Item 5's C in {E/8, E/4, E/2, E}, rounded to whole crops (at least 1)."""
    return tuple(sorted({max(1, round(epochs / k)) for k in (8, 4, 2, 1)}))


def full_grid(strong_teacher: str = STRONG_TEACHER) -> list[Regime]:
    """The grid: 13 training regimes, 7 held-out, item 4's plateau regime. Sized by ``plan`` for about 3 h
    of 2 cores (``--plan``); item 5's budgets sit on two regimes short of data (E = 40 and 60)."""
    weak = TeacherSpec("test_resnet", 2, 3000, OTHERS)  # ~300 a class, 2 epochs
    mid = TeacherSpec("test_resnet", 3, 30000, OTHERS)
    # the weak teacher's partner (as in the demo's pair): an ensemble names each timm architecture once
    mid_byob = TeacherSpec("test_byobnet", 3, 30000, OTHERS)
    resnet = TeacherSpec("resnet10t", 2, 30000, OTHERS)
    regnet = TeacherSpec("regnetx_002", 2, 30000, OTHERS)

    # the "own" regimes' teachers (skip 0) learn from the students' own images and more
    train = [
        Regime("n500-mid-e60", 500, (mid,), 60, budgets=crop_budgets(60)),
        Regime("n1000-mid-e40", 1000, (mid,), 40, budgets=crop_budgets(40)),
        Regime("n1000-weak-e40", 1000, (weak,), 40),
        Regime("n1000-pair-e40", 1000, (mid, regnet), 40),
        Regime("n1000-own-e40", 1000, (TeacherSpec("test_resnet", 40, 1000),), 40),
        Regime("n2000-resnet-e40", 2000, (resnet,), 40),
        Regime("n2000-weakpair-e40", 2000, (weak, mid_byob), 40),
        Regime("n3000-own-e20", 3000, (TeacherSpec("test_resnet", 20, 3000),), 20),
        Regime("n5000-mid-e20", 5000, (mid,), 20),
        Regime("n5000-resnet-e12", 5000, (resnet,), 12),
        Regime("n10000-weak-e8", 10000, (weak,), 8),
        Regime("n10000-pair-e8", 10000, (mid, resnet), 8),
        Regime("n30000-own-e4", 30000, (TeacherSpec("test_resnet", 4, 30000),), 4),
    ]
    held_out = [
        Regime("n800-weakpair-e40", 800, (weak, mid_byob), 40, held_out=True),  # the case
        Regime("n1500-regnet-e40", 1500, (regnet,), 40, held_out=True),
        Regime("n4000-own-e20", 4000, (TeacherSpec("test_resnet", 20, 4000),), 20, held_out=True),
        Regime("n4000-resnet-e20", 4000, (resnet,), 20, held_out=True),
        Regime("n20000-mid-e6", 20000, (mid,), 6, held_out=True),
        # added after the first 18 regimes ran: every held-out regime above had a margin under the rule's
        # threshold, so none tested its "gain" side; these two have margins well above it
        Regime("n700-mid-e50", 700, (mid,), 50, held_out=True),
        Regime("n600-pair-e60", 600, (mid, resnet), 60, held_out=True),
    ]
    strong = TeacherSpec("resnet10t", 0, 60000, 0, strong_teacher)
    plateau = Regime("n60000-plateau-e6", 60000, (strong,), 6, pretrain=True, num_crops=6)
    # added after the first: its 6-epoch student had ended its schedule, not its learning (continuing on hard
    # labels gained 1.6 points); 12 + 12 epochs come closer to a plateau
    plateau12 = Regime("n60000-plateau-e12", 60000, (strong,), 12, pretrain=True, num_crops=6)
    return train + held_out + [plateau, plateau12]


def smoke_grid() -> list[Regime]:
    """Every step kind on a few hundred images, 1-2 epochs (numbers meaningless)."""
    other = TeacherSpec("test_resnet", 1, 200, 300)
    return [
        Regime("n200-other-e2", 200, (other,), 2, budgets=(1, 2)),
        Regime("n200-own-e1", 200, (TeacherSpec("test_resnet", 1, 200),), 1, held_out=True),
        Regime("n300-plateau-e1", 300, (other,), 1, pretrain=True),
    ]


def check_grid(regimes: Sequence[Regime]) -> None:
    """Names must be unique keys (the steps' names) and teachers of other images disjoint from the students'."""
    names = [r.name for r in regimes]
    if len(set(names)) != len(names):
        raise ValueError(f"regime names repeat: {sorted(n for n in names if names.count(n) > 1)}")
    for r in regimes:
        if not r.name.replace("-", "").isalnum():
            raise ValueError(f"regime {r.name!r}: letters, digits and '-' only (it names steps and directories)")
        archs = [t.arch for t in r.teachers]
        if len(set(archs)) != len(archs):
            raise ValueError(f"regime {r.name}: teachers {archs} repeat an architecture; an ensemble names each "
                             "timm architecture once (teacher_cache.teachers)")
        for t in r.teachers:
            if 0 < t.skip < r.images:
                raise ValueError(f"regime {r.name}: teacher {t.name} skips {t.skip} images, fewer than the "
                                 f"students' {r.images}: its images would overlap theirs in part")


# --------------------------------------------------------------------------- the plan and its cost


# Images per second of one model on one core (torch with one thread, batches of 128 at 32 px; resnet10t at 28,
# the size item 4's teacher was trained at): a forward + backward + SGD step, and a forward under no_grad.
# Measured 2026-12-06 on this 2-core AMD EPYC VM while other jobs loaded it (load average 4.7), so they are
# on the slow side of an idle core; the crop budget study's idle figures are about 1.5-2x higher. Online runs
# pay the student's training plus every teacher's inference per crop; the loader (one decode worker) keeps up.
# test_byobnet (0.20 M parameters) is not measured: taken as test_resnet's (0.37 M), which the demo trains at
# about the same rate.
TRAIN_RATE = {"test_efficientnet": 700.0, "test_resnet": 560.0, "test_byobnet": 560.0, "resnet10t": 145.0,
              "regnetx_002": 180.0}
INFER_RATE = {"test_efficientnet": 8800.0, "test_resnet": 1870.0, "test_byobnet": 1870.0, "resnet10t": 590.0,
              "regnetx_002": 1050.0}
RUN_OVERHEAD_S = 15.0  # start-up of a run or a cache: model build, loader workers, manifest, checkpoint
VAL_IMAGES = 10000


def per_image_s(models: Iterable[str], rates: Mapping[str, float]) -> float:
    return sum(1.0 / rates.get(m, min(rates.values())) for m in models)


def estimate_s(step: Step, regime: Regime | None, teacher: TeacherSpec | None, val_images: int) -> float:
    """Estimated seconds of ``step`` on one core, from TRAIN_RATE and INFER_RATE."""
    val = val_images / INFER_RATE[STUDENT]
    if step.kind == "teacher":
        if teacher.weights:
            return 0.0
        return RUN_OVERHEAD_S + teacher.epochs * teacher.images / TRAIN_RATE.get(teacher.arch, 200.0) \
            + val_images / INFER_RATE.get(teacher.arch, 1000.0)
    archs = [t.arch for t in regime.teachers]
    if step.kind == "cache":  # every crop through every teacher, plus their evaluation on the test images
        crops = regime.images * (step.C or regime.C)
        return RUN_OVERHEAD_S + (crops + val_images) * per_image_s(archs, INFER_RATE)
    epochs = short_epochs(regime.epochs) if step.kind == "short" else regime.epochs
    seconds = epochs * regime.images / TRAIN_RATE[STUDENT]
    if step.kind == "online":
        seconds += epochs * regime.images * per_image_s(archs, INFER_RATE)
    return RUN_OVERHEAD_S + seconds + val


def plan_steps(regimes: Sequence[Regime], seeds_of: Callable[[Regime], Sequence[int]] | None = None,
               weighted: Sequence[str] = ()) -> list[list[Step]]:
    """The grid's steps in phases; the steps of one phase are independent of one another.

    ``seeds_of``: the seeds of each regime's students (default: both where the regime always has two, else
    seed 0 and, for the cost estimate, seed 1 on half of the others: the 1-point rule decides at run time);
    ``weighted``: the regimes of item 3's label-weight runs (default, for the estimate: two).
    """
    def seeds(r: Regime) -> Sequence[int]:
        return seeds_of(r) if seeds_of else ((0, 1) if r.always_two_seeds else (0,))

    teachers = {t.name: t for r in regimes for t in r.teachers}
    first = [Step("teacher", name) for name in teachers]
    first += [Step("pre" if r.pretrain else "short", r.name, 0) for r in regimes]
    first += [Step("hard", r.name, 0) for r in regimes if not r.pretrain]  # plateau: after its pre
    caches = [Step("cache", r.name, C=c) for r in regimes for c in (r.C, *[b for b in r.budgets if b != r.C])]
    students = []
    for r in regimes:
        for s in seeds(r):
            kinds = ("cached", "online") if s == 0 and not r.pretrain else ("hard", "cached", "online")
            students += [Step(k, r.name, s) for k in kinds]
            students += [Step("cached", r.name, s, C=b) for b in r.budgets if b != r.C]
    labelled = [Step("cached", name, s, w=w) for name in weighted for s in seeds(by_name(regimes, name))
                for w in LABEL_WEIGHTS]
    return [first, caches, students, labelled]


def by_name(regimes: Sequence[Regime], name: str) -> Regime:
    for r in regimes:
        if r.name == name:
            return r
    raise KeyError(f"no regime {name!r} in this grid")


def plan_table(regimes: Sequence[Regime], val_images: int, jobs: int) -> tuple[str, float]:
    """The plan as text (one line per step, estimated minutes) and its total in core-minutes; the estimate
    assumes seed 1 on half the regimes whose seeds are decided at run time, and item 3 on two regimes."""
    decided = [r for r in regimes if not r.always_two_seeds and not r.held_out]
    extra_seed = {r.name for r in decided[::2]}
    phases = plan_steps(regimes, lambda r: (0, 1) if r.always_two_seeds or r.name in extra_seed else (0,),
                        weighted=[decided[0].name, decided[-1].name] if decided else [])
    teachers = {t.name: t for r in regimes for t in r.teachers}
    lines, total = [], 0.0
    for i, phase in enumerate(phases, 1):
        lines.append(f"phase {i}: {len(phase)} steps")
        for step in phase:
            regime = None if step.kind == "teacher" else by_name(regimes, step.name)
            minutes = estimate_s(step, regime, teachers.get(step.name), val_images) / 60
            total += minutes
            lines.append(f"  {step.key:<48} {minutes:7.1f} min")
    lines.append(f"total: {total:.0f} core-minutes at TRAIN_RATE / INFER_RATE (measured on loaded cores), plus a "
                 f"minute or two per new data tree; with --jobs {jobs}: about {total / max(1, jobs):.0f} min "
                 f"({total / max(1, jobs) / 60:.1f} h) of wall time")
    return "\n".join(lines), total


# --------------------------------------------------------------------------- running the steps


# The files a step leaves for later steps: its record counts as done only while they exist. The grid
# outlives a session (about 3 h of 2 cores), and only the records are kept in git: a later session redoes
# the teachers, caches and pre-trained students whose files are gone (seeded, so the same runs), and
# skips every student whose record is there.
ARTIFACTS = {"teacher": lambda row: row["weights"], "cache": lambda row: Path(row["path"]) / "zarr.json",
             "pre": lambda row: Path(row["run"]) / "best.pt"}


class Grid:
    """The steps of ``regimes`` in WORKDIR, each recorded as STEPS/KEY.json once finished (STEPS: --steps-dir,
    kept in git for a full grid so that it resumes across sessions; WORKDIR/steps otherwise)."""

    def __init__(self, args: argparse.Namespace, argv: list[str], regimes: Sequence[Regime]):
        self.args, self.argv, self.regimes = args, argv, list(regimes)
        self.wd = Path(args.workdir)
        self.steps_dir = Path(getattr(args, "steps_dir", None) or self.wd / "steps")
        self.steps_dir.mkdir(parents=True, exist_ok=True)
        self.teacher_specs = {t.name: t for r in regimes for t in r.teachers}

    # ---- the record of finished steps

    def path(self, key: str) -> Path:
        return self.steps_dir / f"{key.replace(':', '_')}.json"

    def done(self, key: str) -> dict | None:
        try:
            row = json.loads(self.path(key).read_text())
        except FileNotFoundError:
            return None
        artifact = ARTIFACTS.get(row.get("kind"))
        return None if artifact and not Path(artifact(row)).exists() else row

    def record(self, key: str, row: dict) -> dict:
        row = {"key": key, **row}
        atomic_write_json(self.path(key), row)  # one file per step: children never write the same file
        return row

    # ---- the data and the config

    def manifest(self, split: str, images: int, skip: int = 0) -> str:
        """The manifest of ``images`` class-balanced images of ``split`` after the first ``skip``."""
        from data_manifests.fashion_mnist import subset_manifest

        return subset_manifest(self.args.source, self.wd / "data", split, images, skip=skip)

    def config(self, train_manifest: str):
        """The demo's recipe (32 px, batch 128, SGD lr 0.05 cosine, crops at scale 0.64-1) on ``train_manifest``,
        validated on the test images after the last epoch only."""
        from stage2_student_distill.app.demo import demo_config

        a = self.args
        return demo_config(a.config, {
            "runtime.device": a.device, "runtime.progress": False, "runtime.num_workers": a.num_workers,
            "optim.log_every": 10**9, "optim.eval_every": 10**6,  # validated after the last epoch only
            "data.manifest": train_manifest, "data.val_manifest": self.manifest("test", a.val_images),
            # smoke teachers (1 epoch on a few hundred images) may sit at chance: stage 1 would refuse them
            **({"teacher_cache.min_top1_over_chance": 0.0} if a.smoke else {})})

    def teachers(self, regime: Regime) -> ex.Teachers:
        return ex.Teachers(tuple(t.arch for t in regime.teachers),
                           {t.arch: self.done(Step("teacher", t.name).key)["weights"] for t in regime.teachers})

    # ---- the steps

    def step(self, key: str) -> dict:
        """Do one step (its prerequisites are finished) and record it."""
        s = Step.parse(key)
        if s.kind == "teacher":
            return self.record(key, self.teacher(self.teacher_specs[s.name]))
        regime = by_name(self.regimes, s.name)
        if s.kind == "cache":
            return self.record(key, self.cache(regime, s.C or regime.C))
        return self.record(key, self.student(regime, s))

    def teacher(self, t: TeacherSpec) -> dict:
        if t.weights:
            if not Path(t.weights).is_file():
                raise SystemExit(f"error: teacher weights {t.weights} not found: pass --strong-teacher PATH "
                                 "(a `pipeline train` checkpoint of a teacher clearly above the student)")
            return {"kind": "teacher", "weights": str(t.weights), "top1": None, "wall_s": 0.0}  # as given: no machine path
        base = self.config(self.manifest("train", t.images, t.skip))
        run = ex.train(base, ex.ModelRun("hard", t.arch, self.wd / "teachers" / t.name, t.epochs), say)
        return {"kind": "teacher", "weights": str(Path(run.run_dir) / "best.pt"), "top1": run.top1,
                "wall_s": run.wall_s, "seconds": run.seconds, "img_per_s": run.img_per_s}

    def cache(self, regime: Regime, C: int) -> dict:
        """The regime's cache of C crops per image; the main one (C = regime.C) also scores the teachers."""
        from common.cache_format import CacheReader

        main = C == regime.C
        base = self.config(self.manifest("train", regime.images))
        say(f"cache {regime.name} C = {C}: {C * regime.images:,} crops")
        made = ex.build_cache(base, ex.CacheSpec(
            self.wd / "caches" / f"{regime.name}-C{C}", self.teachers(regime), base.data.val_manifest if main else "",
            {"crops.num_crops": C, "teacher_cache.batch_size": 256}))
        agreement = CacheReader(made.path).attrs.get("label_agreement") or {}
        top1 = ex.teacher_top1(made.evaluation)
        return {"kind": "cache", "regime": regime.name, "C": C, "path": made.path, "seconds": made.seconds,
                "crops_per_s": made.summary.get("crops_per_s"), "ensemble_top1": top1.ensemble,
                "teacher_top1": top1.teachers, "agreement_pct": agreement.get("crops_pct"),
                "mostly_disagreeing_pct": agreement.get("images_mostly_disagreeing_pct")}

    def student(self, regime: Regime, s: Step) -> dict:
        """A student run: short / pre / hard on hard labels, cached / online with MEAL V2."""
        base = self.config(self.manifest("train", regime.images))
        keys: dict[str, Any] = {"runtime.seed": s.seed}
        if regime.pretrain and s.kind != "pre":  # item 4: continue from the hard-label student's plateau
            start = str(Path(self.done(Step("pre", regime.name, 0).key)["run"]) / "best.pt")
            keys["train.weights" if s.kind == "hard" else "distill.student_weights"] = start
        if s.w is not None:
            keys["distill.label_weight"] = s.w
        kind = {"short": "hard", "pre": "hard"}.get(s.kind, s.kind)
        cache = self.done(Step("cache", regime.name, C=s.C or regime.C).key)["path"] if kind == "cached" else ""
        epochs = short_epochs(regime.epochs) if s.kind == "short" else regime.epochs
        run = ex.train(base, ex.ModelRun(kind, STUDENT, self.wd / "runs" / s.key.replace(":", "_"), epochs, cache,
                                         self.teachers(regime) if kind == "online" else None, keys), say)
        return {"kind": s.kind, "regime": regime.name, "seed": s.seed, "C": s.C or (regime.C if kind == "cached"
                else None), "w": s.w, "run": run.run_dir, "epochs": run.epochs, "top1": run.top1,
                "wall_s": run.wall_s, "seconds": run.seconds, "img_per_s": run.img_per_s, "jobs": self.args.jobs}

    # ---- running them

    def run(self, steps: Sequence[Step]) -> dict[str, dict]:
        """Finish ``steps`` (independent of one another, ``run_steps``) and return their records."""
        run_steps([s.key for s in steps if self.done(s.key) is None], self.step, "benchmarks.bench_distill_regimes",
                  self.argv, self.args.jobs, self.wd)
        return {s.key: self.done(s.key) for s in steps}

    def prepare_data(self) -> None:
        """Every data tree and manifest, here: children running at once would write the same tree together."""
        self.manifest("test", self.args.val_images)
        for images, skip in sorted({(r.images, 0) for r in self.regimes} | {
                (t.images, t.skip) for t in self.teacher_specs.values() if not t.weights}):
            self.manifest("train", images, skip)

    def all(self) -> dict[str, dict]:
        """Every phase in order; seed 1 and item 3's regimes decided from the runs before them."""
        self.prepare_data()
        first, caches, seed0, _ = plan_steps(self.regimes)  # seed 0, and seed 1 where a regime always has two
        done = {**self.run(first), **self.run(caches), **self.run(seed0)}  # in this order: each needs the one before
        needs_seed1 = {r.name for r in self.regimes if r.always_two_seeds or abs(gain_of(done, r.name, 0)) < 1.0}
        seeds = lambda r: (0, 1) if r.name in needs_seed1 else (0,)  # noqa: E731
        done.update(self.run(plan_steps(self.regimes, seeds)[2]))
        training = [row for row in regime_rows(self.regimes, done) if not row["held_out"] and not row["pretrain"]]
        # the one that lost most, the one that gained most, and the one that lost most although its teachers
        # were above the short run (the loss a user would not have expected)
        above = [r for r in training if (r["features"].get("margin") or 0.0) > 0]
        weighted = sorted({min(training, key=lambda r: r["gain"])["regime"],
                           max(training, key=lambda r: r["gain"])["regime"],
                           *([min(above, key=lambda r: r["gain"])["regime"]] if above else [])}) if training else []
        done.update(self.run(plan_steps(self.regimes, seeds, weighted)[3]))
        return done


def gain_of(done: Mapping[str, dict], regime: str, seed: int) -> float:
    return done[Step("cached", regime, seed).key]["top1"] - done[Step("hard", regime, seed).key]["top1"]


# --------------------------------------------------------------------------- analysis (pure)


def mean_top1(done: Mapping[str, dict], steps: Iterable[Step]) -> float | None:
    values = [done[s.key]["top1"] for s in steps if done.get(s.key) and done[s.key].get("top1") is not None]
    return float(np.mean(values)) if values else None


def regime_rows(regimes: Sequence[Regime], done: Mapping[str, dict]) -> list[dict]:
    """Per regime: the figures before stage 2, each student's top-1 (mean over the seeds run), the gains."""
    rows = []
    for r in regimes:
        cache = done.get(Step("cache", r.name, C=r.C).key) or {}
        short = done.get(Step("pre" if r.pretrain else "short", r.name, 0).key) or {}
        seeds = [s for s in (0, 1) if done.get(Step("cached", r.name, s).key)]
        hard, cached, online = (mean_top1(done, [Step(k, r.name, s) for s in seeds])
                                for k in ("hard", "cached", "online"))
        features = features_of(cache.get("ensemble_top1"), cache.get("agreement_pct"), short.get("top1"))
        budgets = {C: mean_top1(done, [Step("cached", r.name, s, C=None if C == r.C else C) for s in seeds])
                   for C in sorted({r.C, *r.budgets})} if r.budgets else {}
        weights = {w: mean_top1(done, [Step("cached", r.name, s, w=w) for s in seeds]) for w in LABEL_WEIGHTS}
        rows.append({
            "regime": r.name, "held_out": r.held_out, "pretrain": r.pretrain, "describe": r.describe(),
            "images": r.images, "epochs": r.epochs, "C": r.C, "seeds": seeds, "features": features,
            "hard": hard, "cached": cached, "online": online,
            "gain": None if hard is None or cached is None else cached - hard,
            "online_gain": None if hard is None or online is None else online - hard,
            "budgets": budgets, "label_weights": {w: v for w, v in weights.items() if v is not None}})
    return rows


def thresholds(values: Sequence[float]) -> list[float]:
    """Candidate thresholds: midpoints between consecutive distinct values (the widest gap for each split),
    and one below the smallest (a condition that always or never holds)."""
    v = sorted(set(values))
    return [v[0] - 1.0] + [(a + b) / 2 for a, b in zip(v, v[1:])]


# A gain under a point either way is no outcome: the grid's own second seeds moved a run by 0.6 points on
# average and up to 1.5, and flipped the sign of four such gains. It is also the doubt band that buys a regime
# its second seed. Distilling a tie costs under a point whichever call a rule makes.
TIE_POINTS = 1.0


def outcome(gain: float, tie: float = TIE_POINTS) -> str:
    """"gain", "loss", or "tie" (|gain| < ``tie``). With tie = 0 there are no ties and a gain of exactly 0
    is a loss: the sign target the report compares with."""
    return "tie" if abs(gain) < tie else ("gain" if gain > 0 else "loss")


def search_rule(rows: Sequence[Mapping[str, Any]], features: Sequence[str] = RELATIVE_FEATURES,
                tie: float = TIE_POINTS) -> Rule:
    """The threshold rule on one or two ``features`` that calls the most ``rows`` with a clear outcome right.

    ``rows``: {"features": {name: value}, "gain": points}; rows missing a feature or the gain are left out, and
    so are ties (|gain| < ``tie``: either call is right). Exhaustive: every threshold (``thresholds``) and
    direction of every feature, and with two, both "and" and "or" of every pair. Ties go to fewer conditions,
    then the larger margin (the smallest distance of any row's value from a threshold, in units of that
    feature's range: a rule whose thresholds sit in wide gaps is less likely to flip on the next regime), then
    the feature order given.
    """
    rows = [r for r in rows if r.get("gain") is not None and all(r["features"].get(f) is not None for f in features)
            and outcome(r["gain"], tie) != "tie"]
    if not rows:
        raise ValueError("no regime with every feature and a clear gain or loss: nothing to derive a rule from")
    labels = [r["gain"] > 0 for r in rows]
    spans = {f: (max(r["features"][f] for r in rows) - min(r["features"][f] for r in rows)) or 1.0 for f in features}
    singles = [Condition(f, t, above) for f in features
               for t in thresholds([r["features"][f] for r in rows]) for above in (True, False)]

    def margin(conditions: Sequence[Condition]) -> float:
        return min(abs(r["features"][c.feature] - c.threshold) / spans[c.feature] for r in rows for c in conditions)

    best, best_score = None, None
    candidates = [((c,), "and") for c in singles] + [
        ((a, b), op) for a, b in itertools.combinations(singles, 2) if a.feature != b.feature for op in ("and", "or")]
    for conditions, op in candidates:
        rule = Rule(conditions, op)
        accuracy = float(np.mean([rule.predicts_gain(r["features"]) == y for r, y in zip(rows, labels)]))
        score = (accuracy, -len(conditions))
        if best_score is not None and score < best_score[:2]:
            continue
        m = margin(conditions)
        if best_score is None or (*score, m) > best_score:
            best, best_score = replace(rule, accuracy=accuracy, margin=m), (*score, m)
    return best


def evaluate_rule(rule: Rule, rows: Sequence[Mapping[str, Any]], tie: float = TIE_POINTS) -> list[dict]:
    """The rule's call on each row with its features and gain: {"regime", "call", "actual", "hit"}; ``actual`` is
    "tie" and ``hit`` None where |gain| < ``tie``."""
    out = []
    for r in rows:
        if r.get("gain") is None or any(r["features"].get(c.feature) is None for c in rule.conditions):
            continue
        call, actual = ("gain" if rule.predicts_gain(r["features"]) else "loss"), outcome(r["gain"], tie)
        out.append({"regime": r["regime"], "call": call, "actual": actual,
                    "hit": None if actual == "tie" else call == actual})
    return out


def points_lost(calls: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean top-1 points a user gives away against the better of hard labels and cached MEAL V2, per regime:
    following the rule's ``calls`` (ties included: a call the wrong side of a tie gives its fraction away),
    always distilling, never distilling."""
    gains = {r["regime"]: r["gain"] for r in rows if r.get("gain") is not None}
    picked = [c for c in calls if c["regime"] in gains]
    if not picked:
        return {}
    lost = lambda g, distil: max(0.0, -g) if distil else max(0.0, g)  # noqa: E731
    g = [gains[c["regime"]] for c in picked]
    return {"rule": float(np.mean([lost(gains[c["regime"]], c["call"] == "gain") for c in picked])),
            "always": float(np.mean([lost(x, True) for x in g])), "never": float(np.mean([lost(x, False) for x in g]))}


def analyse(rows: Sequence[Mapping[str, Any]]) -> dict:
    """The tool's rule (on the relative figures) from the training regimes, checked on the held-out ones (item 4's
    regime is neither); for comparison the best rule on every figure, absolute top-1s included, and the rule
    that a target of "gain > 0" (ties counted as outcomes) gives."""
    train = [r for r in rows if not r["held_out"] and not r["pretrain"]]
    held = [r for r in rows if r["held_out"]]

    def derive(features: Sequence[str], tie: float = TIE_POINTS) -> dict:
        try:
            rule = search_rule(train, features, tie=tie)
        except ValueError:  # every outcome a tie (a --smoke grid): judge by sign, and the report says so
            tie = 0.0
            rule = search_rule(train, features, tie=tie)
        train_calls, held_calls = evaluate_rule(rule, train, tie), evaluate_rule(rule, held, tie)
        judged = [c for c in held_calls if c["hit"] is not None]
        return {"rule": str(rule), "conditions": [asdict(c) for c in rule.conditions], "op": rule.op,
                "features": list(features), "tie_points": tie, "train_accuracy": rule.accuracy, "margin": rule.margin,
                "calls": {c["regime"]: c for c in train_calls + held_calls},
                "train_judged": sum(c["hit"] is not None for c in train_calls),
                "held_out_hits": sum(c["hit"] for c in judged), "held_out_total": len(judged),
                "held_out_ties": len(held_calls) - len(judged),
                "points_lost": {"training": points_lost(train_calls, train), "held_out": points_lost(held_calls, held)}}

    relative = derive(RELATIVE_FEATURES)
    # what the cache costs against fresh crops, regime by regime (C = E/4; item 5 has the other C)
    both = [r["cached"] - r["online"] for r in rows if r["cached"] is not None and r["online"] is not None]
    return {**relative, "any_figure": derive(ALL_FEATURES), "sign_target": derive(RELATIVE_FEATURES, tie=0.0),
            "library_rule": str(MEASURED_RULE), "library_rule_matches": str(MEASURED_RULE) == relative["rule"],
            "cached_minus_online": {"mean": float(np.mean(both)), "min": min(both), "max": max(both),
                                    "regimes": len(both)} if both else None}


# --------------------------------------------------------------------------- report


def fmt(x: float | None, signed: bool = False) -> str:
    return "-" if x is None else (f"{x:+.2f}" if signed else f"{x:.2f}")


def rule_lines(analysis: Mapping[str, Any], n_train: int) -> list[str]:
    """The tool's rule and the two comparisons: how each was found, its hits, the points a user gives away."""
    def lost(a: Mapping[str, Any], part: str) -> str:
        p = a["points_lost"][part]
        return (f"points given away per regime against the better choice: {p['rule']:.2f} following it, "
                f"{p['always']:.2f} always distilling, {p['never']:.2f} never") if p else ""

    def judged(a: Mapping[str, Any]) -> str:
        tie = a.get("tie_points", 0.0)
        return (f"calls right on {a['train_accuracy']:.0%} of the {a.get('train_judged', n_train)} training regimes "
                + (f"with a clear outcome (|cached - hard| >= {tie:g} point; ties count either way)" if tie else
                   "(every gain > 0 a gain)")
                + f", margin {a['margin']:.3f}; held out: {a['held_out_hits']} of {a['held_out_total']} right"
                + (f", {a['held_out_ties']} ties" if a.get("held_out_ties") else ""))

    comparisons = (
        (analysis, "the tool's rule, on the relative figures " + ", ".join(analysis["features"])),
        (analysis.get("sign_target"), "for comparison, the same figures with every gain above 0 counted as a "
         "gain, ties included: the target first tried, which fits gains that flip sign between seeds"),
        (analysis.get("any_figure"), "for comparison, on every figure (absolute top-1s too, which do not carry "
         "to another dataset): " + ", ".join((analysis.get("any_figure") or {}).get("features", ()))))
    lines = []
    for a, what in comparisons:
        if a:
            lines.append(f"* **Rule** ({what}; exhaustive search over one- and two-feature thresholds on the "
                         f"{n_train} training regimes): **{a['rule']}**; {judged(a)}. Training regimes: "
                         f"{lost(a, 'training')}; held out: {lost(a, 'held_out')}.")
    c = analysis.get("cached_minus_online")
    if c:
        lines.append(f"* **Cached (C = E/4) - online fresh crops**, over the {c['regimes']} regimes with both: mean "
                     f"{c['mean']:+.2f} points, from {c['min']:+.2f} to {c['max']:+.2f}.")
    if "library_rule" in analysis:
        lines.append(f"* **The rule `teacher-cache` and `distill` apply** (stage1_teacher_cache/distill_advice.py "
                     f"MEASURED_RULE): {analysis['library_rule']}"
                     + (" (the same)." if analysis["library_rule_matches"] else
                        " -- **differs from the rule derived here: update MEASURED_RULE.**"))
    return lines


def verdict(call: Mapping[str, Any] | None) -> str:
    """The rule's call against the outcome, for the tables."""
    if not call:
        return "-"
    return "tie" if call["hit"] is None else ("hit" if call["hit"] else "MISS")


def report(payload: Mapping[str, Any]) -> str:
    """The markdown report: the grid's table with the rule's calls, and items 3, 4 and 5."""
    rows, analysis = payload["regimes"], payload["analysis"]
    lines = [f"### Distillation regimes (issue 25) ({payload.get('finished_at', '')})", ""]
    if payload.get("command"):
        lines += [f"* **Command**: `{payload['command']}`"]
    if payload.get("machine_line"):
        lines += [f"* **{payload['machine_line']}**"]
    lines += [f"* **Students**: {STUDENT}, the demo's recipe (32 px, batch 128, SGD lr 0.05 cosine, crop scale "
              "0.64-1); cached C = E/4; short run = E/4 epochs of hard labels; top-1 on "
              f"{payload.get('args', {}).get('val_images', VAL_IMAGES):,} test images, mean over the seeds listed.",
              *rule_lines(analysis, sum(not r["held_out"] and not r["pretrain"] for r in rows)), ""]
    head = ("| regime | held out | ensemble | agreement | short hard | margin | seeds | hard | cached | online | "
            "cached - hard | online - hard | rule's call | hit |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r["pretrain"]:
            continue
        f, call = r["features"], analysis["calls"].get(r["regime"])
        lines.append(f"| {r['regime']} | {'yes' if r['held_out'] else ''} | {fmt(f['ensemble'])} | "
                     f"{fmt(f['agreement'])} | {fmt(f['short_hard'])} | {fmt(f['margin'], True)} | "
                     f"{','.join(map(str, r['seeds']))} | {fmt(r['hard'])} | {fmt(r['cached'])} | {fmt(r['online'])} | "
                     f"{fmt(r['gain'], True)} | {fmt(r['online_gain'], True)} | {call['call'] if call else '-'} | "
                     f"{verdict(call)} |")
    lines += ["", "Regimes: " + "; ".join(f"{r['regime']}: {r['describe']}" for r in rows), ""]
    weighted = [r for r in rows if r["label_weights"]]
    if weighted:
        lines += ["Item 3, `--label-weight w` (cached, C = E/4):", "",
                  "| regime | w = 0 | " + " | ".join(f"w = {w:g}" for w in LABEL_WEIGHTS) + " | hard |",
                  "|---|---|" + "---|" * len(LABEL_WEIGHTS) + "---|"]
        lines += [f"| {r['regime']} | {fmt(r['cached'])} | " + " | ".join(
            fmt(r["label_weights"].get(w)) for w in LABEL_WEIGHTS) + f" | {fmt(r['hard'])} |" for r in weighted]
        lines.append("")
    for r in rows:
        if r["pretrain"]:
            lines += [f"Item 4, MEAL V2's structure ({r['describe']}): the hard-label student after {r['epochs']} "
                      f"epochs: {fmt(r['features']['short_hard'])}; continued {r['epochs']} more epochs (seeds "
                      f"{r['seeds']}): hard labels {fmt(r['hard'])}, cached (C = {r['C']}) {fmt(r['cached'])}, "
                      f"online {fmt(r['online'])}; ensemble {fmt(r['features']['ensemble'])}.", ""]
        if r["budgets"]:
            lines += [f"Item 5, crops against epochs ({r['regime']}, E = {r['epochs']}, seeds {r['seeds']}): "
                      + ", ".join(f"C = {C}: {fmt(v)}" for C, v in r["budgets"].items())
                      + f"; online fresh {fmt(r['online'])}; hard {fmt(r['hard'])}.", ""]
    if payload.get("plot"):
        lines.append(f"![gain against {analysis['conditions'][0]['feature']}]({payload['plot']})")
    return "\n".join(lines) + "\n"


def margin_table(payload: Mapping[str, Any]) -> str:
    """docs/teachers.md's table: every regime by its margin (the rule's figure), with the gains and the rule's call."""
    analysis = payload["analysis"]
    rows = sorted((r for r in payload["regimes"] if not r["pretrain"] and r["features"]["margin"] is not None),
                  key=lambda r: -r["features"]["margin"])
    lines = [f"Rule: **{analysis['rule']}** (points of the ensemble's top-1 above a hard-label run of E/4 epochs). "
             f"Right on {analysis['train_accuracy']:.0%} of the training regimes with a clear outcome and on "
             f"{analysis['held_out_hits']} of {analysis['held_out_total']} held out; a tie (|cached - hard| under "
             f"{analysis.get('tie_points', TIE_POINTS):g} point) is right either way.", "",
             "| regime | held out | ensemble | short run | margin | hard labels | cached - hard | online - hard | "
             "rule says | right? |", "|" + "---|" * 10]
    for r in rows:
        call = analysis["calls"].get(r["regime"])
        lines.append(f"| {r['regime']} | {'yes' if r['held_out'] else ''} | {fmt(r['features']['ensemble'])} | "
                     f"{fmt(r['features']['short_hard'])} | {fmt(r['features']['margin'], True)} | {fmt(r['hard'])} | "
                     f"{fmt(r['gain'], True)} | {fmt(r['online_gain'], True)} | "
                     f"{('distil' if call['call'] == 'gain' else 'keep labels') if call else '-'} | "
                     f"{ {'hit': 'yes', 'MISS': '**no**', 'tie': 'tie: either'}.get(verdict(call), '-')} |")
    if payload.get("plot"):
        lines += ["", f"![gain against margin]({payload['plot']})"]
    return "\n".join(lines) + "\n"


def plot_gain(payload: Mapping[str, Any], path: Path) -> Path:
    """Gain (cached - hard) against the rule's first feature: training and held-out regimes, its threshold."""
    first = payload["analysis"]["conditions"][0]
    with figure(path, (6.5, 4.2), dpi=120) as ax:
        for held, marker, label in ((False, "o", "training regimes"), (True, "s", "held-out regimes")):
            points = [(r["features"][first["feature"]], r["gain"], r["regime"]) for r in payload["regimes"]
                      if r["held_out"] == held and not r["pretrain"] and r["gain"] is not None
                      and r["features"].get(first["feature"]) is not None]
            if points:
                ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, label=label)
                for x, y, name in points:
                    ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.axhline(0.0, color="gray", linewidth=1)
        tie = payload["analysis"].get("tie_points", 0.0)
        if tie:
            ax.axhspan(-tie, tie, color="gray", alpha=0.15, label=f"tie: under {tie:g} point either way")
        ax.axvline(first["threshold"], color="C3", linestyle="--", linewidth=1,
                   label=f"rule: {payload['analysis']['rule']}")
        ax.set_xlabel(f"{first['feature']} (before stage 2)")
        ax.set_ylabel("cached MEAL V2 - hard labels (points)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return path


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    p, _ = demo_parser(__doc__)
    p.add_argument("--smoke", action="store_true", help="every step kind on a few hundred images, 1-2 epochs")
    p.add_argument("--plan", action="store_true", help="print the steps and their estimated minutes, run nothing")
    p.add_argument("--workdir", default=None, help="data, runs, caches, steps/ (reruns resume; "
                                                   "default runs/distill-regimes[-smoke])")
    p.add_argument("--steps-dir", default=None, help="the finished steps' records (default "
                                                     "benchmarks/results/distill_regimes_steps, kept in git; "
                                                     "with --smoke WORKDIR/steps)")
    p.add_argument("--val-images", type=int, default=VAL_IMAGES, help="test images scored")
    p.add_argument("--strong-teacher", default=STRONG_TEACHER, help="item 4's teacher: a resnet10t checkpoint")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--num-workers", type=int, default=1, help="decode workers of each run (1: one core a run)")
    p.add_argument("--jobs", type=int, default=1, help="independent steps at a time, each in its own process")
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/distill_regimes.json)")
    p.add_argument("--report", default=None, help="markdown (default benchmarks/results/distill_regimes.md)")
    p.add_argument("--plot", default=None, help="PNG (default docs/img/distill_regimes.png)")
    p.add_argument("--doc", default=None, help="markdown whose marked section gets the report too (default "
                                               "docs/results.md; none with --smoke)")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)  # one step, in a child of --jobs > 1
    args = p.parse_args(argv)
    if args.smoke:
        args.val_images = 200
    wd = Path(args.workdir or f"runs/distill-regimes{'-smoke' if args.smoke else ''}")
    args.workdir = str(wd)
    args.steps_dir = args.steps_dir or str(wd / "steps" if args.smoke else REPO / "benchmarks/results/distill_regimes_steps")
    args.out = args.out or str(wd / "distill_regimes.json" if args.smoke else REPO / "benchmarks/results/distill_regimes.json")
    args.report = args.report or str(wd / "distill_regimes.md" if args.smoke else REPO / "benchmarks/results/distill_regimes.md")
    args.plot = args.plot or str(wd / "distill_regimes.png" if args.smoke else REPO / "docs/img/distill_regimes.png")
    args.doc = args.doc or (None if args.smoke else str(REPO / "docs/results.md"))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    regimes = smoke_grid() if args.smoke else full_grid(args.strong_teacher)
    check_grid(regimes)
    if args.plan:
        text, _ = plan_table(regimes, args.val_images, args.jobs)
        print(text)
        return 0
    grid = Grid(args, argv, regimes)
    if args.step:  # one step, as a child of an invocation with --jobs > 1
        grid.step(args.step)
        return 0
    started, info, _ = begin(args.workdir)
    done = grid.all()
    rows = regime_rows(regimes, done)
    payload = {**run_header(args, started, info), "machine_line": machine_line(info), "regimes": rows,
               "analysis": analyse(rows), "steps": done,
               "plot": os.path.relpath(args.plot, Path(args.report).resolve().parent)}
    path = write_results("distill_regimes", payload, args.out)
    plot_gain(payload, Path(args.plot))
    text = report(payload)
    Path(args.report).write_text(text)
    if args.doc:  # the same report, and the user's page (teachers.md) the rule's table; plots linked from there
        doc = Path(args.doc)
        for page, render, section in ((doc, report, "bench_distill_regimes"),
                                      (doc.parent / "teachers.md", margin_table, "bench_distill_regimes[margins]")):
            update_marked_section(page, render({**payload, "plot": os.path.relpath(args.plot, page.resolve().parent)}),
                                  section)
    print("\n" + text + f"\nJSON: {path}\nreport: {args.report}\nplot: {args.plot}", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
