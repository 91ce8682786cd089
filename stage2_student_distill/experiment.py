"""The experiment driver: data -> teachers -> teacher cache -> students -> results table and plot.

`pipeline demo` (stage2_student_distill/app/demo.py) and the Fashion-MNIST benchmarks (benchmarks/bench_fashion_mnist.py,
bench_crop_budget.py, bench_topk_student.py) are this driver with different settings. It lives in stage 2,
the library's top stage, because it calls stage 1 (the cache) as well as stage 2 (training).

Every step goes through a public entry point (`pipeline train`'s ``run_train``, `pipeline distill`'s
``run_distill``, `pipeline teacher-cache`'s ``run``) and is skipped when its output is complete: a training
run whose metrics.jsonl reaches its epochs is not started again, an interrupted one resumes from its last.pt,
and stage 1 skips the shards it has. Rerunning a driver therefore resumes it.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from common.config import Config
from stage2_student_distill.metrics import read_metrics

# How a model is trained: `pipeline train` on hard labels, or `pipeline distill` from one of three target sources.
KINDS = {
    "hard": "hard labels (`pipeline train`)",
    "cached": "MEAL V2 from the cache (`pipeline distill --cache`)",
    "online": "online MEAL V2 on fresh crops (`pipeline distill --online`)",
    "replay": "online MEAL V2 on the cache's crops (`pipeline distill --online --replay-cache`)",
}


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class FashionMnistData:
    """Class-balanced subsets of Fashion-MNIST's idx files, as PNG trees and manifests."""

    source_dir: str
    data_dir: str
    train_images: int  # the students'
    val_images: int  # test images scored
    teacher_train_images: int | None = None  # the teachers' (None: no teacher tree is needed)
    progress: bool = False


@dataclass(frozen=True)
class Manifests:
    train: str
    val: str
    teacher_train: str | None = None


def prepare_data(spec: FashionMnistData) -> Manifests:
    """The manifests of ``spec``; each tree is written once (``subset_manifest`` skips a complete one)."""
    from data_manifests.fashion_mnist import subset_manifest

    def tree(split: str, images: int) -> str:
        return subset_manifest(spec.source_dir, spec.data_dir, split, images, spec.progress)

    train = tree("train", spec.train_images)
    teacher_train = tree("train", spec.teacher_train_images) if spec.teacher_train_images else None
    return Manifests(train=train, val=tree("test", spec.val_images), teacher_train=teacher_train)


@dataclass(frozen=True)
class Recipe:
    """What every run of one experiment shares (the students', and the teachers' unless a run overrides it)."""

    img_size: int
    batch_size: int
    eval_batch_size: int
    eval_every: int
    lr: float
    schedule: str
    weight_decay: float
    loader: str
    num_crops: int
    crop_scale: tuple[float, float]


def base_config(cfg: Config, recipe: Recipe, manifests: Manifests) -> Config:
    """``cfg`` with ``recipe`` and the students' manifests: the config every step starts from."""
    optim = ("img_size", "batch_size", "eval_batch_size", "eval_every", "lr", "schedule", "weight_decay", "loader")
    return cfg.replace(**{
        **{f"optim.{key}": getattr(recipe, key) for key in optim},
        "crops.num_crops": recipe.num_crops,
        "crops.scale": list(recipe.crop_scale),
        "data.manifest": manifests.train,
        "data.val_manifest": manifests.val,
    })


# --------------------------------------------------------------------------- training runs


@dataclass(frozen=True)
class Teachers:
    """A trained ensemble: timm names and each one's weights (a `pipeline train` checkpoint)."""

    names: tuple[str, ...]
    weights: Mapping[str, str]

    @classmethod
    def from_runs(cls, run_dirs: Mapping[str, str | Path]) -> "Teachers":
        """The best checkpoint of each teacher's `pipeline train` run."""
        return cls(tuple(run_dirs), {name: str(Path(d) / "best.pt") for name, d in run_dirs.items()})

    def overrides(self) -> dict[str, Any]:
        """The config keys through which stage 1 and online stage 2 load these teachers."""
        return {"teacher_cache.teachers": list(self.names),
                "teacher_cache.teacher_weights": [f"{n}={self.weights[n]}" for n in self.names],
                "teacher_cache.pretrained": False}


@dataclass(frozen=True)
class ModelRun:
    """One training run of ``model`` for ``epochs`` into ``run_dir``; ``kind`` is one of KINDS."""

    kind: str
    model: str
    run_dir: Path
    epochs: int
    cache: str = ""  # cached: the cache read; replay: the cache whose crops are replayed
    teachers: Teachers | None = None  # online and replay: the teachers in the loop
    overrides: Mapping[str, Any] = field(default_factory=dict)  # further config keys (seed, weights, manifest, ...)


@dataclass(frozen=True)
class RunRecord:
    """What a run's metrics.jsonl says, plus the cost of this invocation's share of it."""

    run_dir: str
    epochs: int  # epochs done
    top1: float | None  # the last validated epoch's
    best_top1: float | None
    curve: list[float]  # top-1 of every validated epoch
    img_per_s: float | None  # mean over the epochs
    wall_s: float  # sum over the epochs, so a resumed run counts each epoch once
    teacher_s: float | None  # online runs: the teachers' share of wall_s
    train_images: int | None  # of the manifest the run trained on (a reused run's may differ)
    seconds: float | None = None  # wall seconds spent on it now; None when it was complete already
    cpu_s: float | None = None


def run_record(run_dir: str | Path, seconds: float | None = None, cpu_s: float | None = None) -> RunRecord:
    from common.manifest import load_manifest

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    curve = [r["val_top1"] for r in rows if "val_top1" in r]
    teacher_s = [r["teacher_s"] for r in rows if "teacher_s" in r]
    try:  # what the run trained on, from the config it saved
        train_images = load_manifest(json.loads((run_dir / "config.json").read_text())["data"]["manifest"]).num_images
    except (OSError, KeyError, ValueError):
        train_images = None
    return RunRecord(
        run_dir=str(run_dir), epochs=epochs_done(run_dir), top1=curve[-1] if curve else None,
        best_top1=max(curve) if curve else None, curve=curve,
        img_per_s=sum(r["img_per_s"] for r in rows) / len(rows) if rows else None,
        wall_s=float(sum(r["time_s"] for r in rows)), teacher_s=float(sum(teacher_s)) if teacher_s else None,
        train_images=train_images, seconds=seconds, cpu_s=cpu_s)


def epochs_done(run_dir: str | Path) -> int:
    return max((r["epoch"] for r in read_metrics(Path(run_dir) / "metrics.jsonl")), default=0)


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float, float]:
    """(``fn(*args)``, wall seconds, process CPU seconds)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - t0, time.process_time() - c0


def run_config(base: Config, spec: ModelRun) -> Config:
    """The config of ``spec``: `pipeline train`'s for kind hard, `pipeline distill`'s otherwise."""
    if spec.kind not in KINDS:
        raise ValueError(f"ModelRun.kind {spec.kind!r} is not one of {sorted(KINDS)}")
    resume = (Path(spec.run_dir) / "last.pt").exists()
    if spec.kind == "hard":
        keys = {"train.model": spec.model, "train.out": str(spec.run_dir), "train.resume": resume}
    else:
        keys = {"distill.student": spec.model, "distill.out": str(spec.run_dir), "distill.resume": resume,
                "distill.online": spec.kind in ("online", "replay"),
                "distill.cache": spec.cache if spec.kind == "cached" else "",
                "distill.replay_cache": spec.cache if spec.kind == "replay" else "",
                **(spec.teachers.overrides() if spec.teachers and spec.kind != "cached" else {})}
    return base.replace(**{**keys, "optim.epochs": spec.epochs, **spec.overrides})


def train(base: Config, spec: ModelRun, say: Callable[[str], None] | None = None) -> RunRecord:
    """Train ``spec`` unless its metrics already reach its epochs (resuming an interrupted run)."""
    from stage2_student_distill.train import run_distill, run_train

    seconds = cpu_s = None
    if epochs_done(spec.run_dir) < spec.epochs:
        if say:
            say(f"{spec.model}: {KINDS[spec.kind]}, {spec.epochs} epochs -> {spec.run_dir}")
        _, seconds, cpu_s = timed(run_train if spec.kind == "hard" else run_distill, run_config(base, spec))
    return run_record(spec.run_dir, seconds, cpu_s)


# --------------------------------------------------------------------------- the teacher cache


@dataclass(frozen=True)
class CacheSpec:
    """A cache of ``teachers``' soft labels on the base config's training manifest and crops."""

    path: Path
    teachers: Teachers
    evaluate_manifest: str = ""  # score each teacher and the ensemble on these images first
    overrides: Mapping[str, Any] = field(default_factory=dict)  # crops.num_crops, teacher_cache.topk, ...


@dataclass(frozen=True)
class CacheResult:
    path: str
    summary: dict[str, Any]  # stage 1's (``run``'s return value): shards written, crops/s, bytes on disk, ...
    evaluation: dict[str, Any] | None  # the cache's ``teacher_eval`` attribute
    seconds: float
    cpu_s: float


def build_cache(base: Config, spec: CacheSpec) -> CacheResult:
    """Stage 1 on ``spec`` (it resumes: complete shards are skipped)."""
    from stage1_teacher_cache.run import run as run_teacher_cache

    cfg = base.replace(**{**spec.teachers.overrides(), "teacher_cache.out": str(spec.path),
                          "teacher_cache.evaluate_manifest": spec.evaluate_manifest, **spec.overrides})
    summary, seconds, cpu_s = timed(run_teacher_cache, cfg)
    return CacheResult(str(spec.path), summary, cache_evaluation(spec.path), seconds, cpu_s)


def cache_evaluation(cache: str | Path) -> dict[str, Any] | None:
    """The ``teacher_eval`` attribute of ``cache``, in percent (None when it was built without --evaluate-teachers)."""
    from common.cache_format import CacheReader
    from stage1_teacher_cache.teacher_eval import read_teacher_eval

    return read_teacher_eval(CacheReader(str(cache)).attrs.get("teacher_eval"))


@dataclass(frozen=True)
class TeacherTop1:
    """Top-1 in percent (as training runs report it) on the evaluation manifest of a cache's ``teacher_eval``."""

    teachers: dict[str, float]  # per teacher, by name
    ensemble: float | None  # the mean softmax


def teacher_top1(evaluation: Mapping[str, Any] | None) -> TeacherTop1:
    """Per-teacher and ensemble top-1 of a ``teacher_eval`` record (read as ``read_teacher_eval`` reads it:
    older records hold fractions); empty for a cache built without --evaluate-teachers."""
    from stage1_teacher_cache.teacher_eval import read_teacher_eval

    evaluation = read_teacher_eval(evaluation)
    if not evaluation:
        return TeacherTop1({}, None)
    return TeacherTop1({name: r["top1"] for name, r in evaluation["teachers"].items()}, evaluation["ensemble"]["top1"])


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ResultRow:
    model: str
    top1: float | None  # percent
    epochs: int | None


def results_table(rows: Sequence[ResultRow]) -> str:
    """The markdown table of `pipeline demo` (results.md): model, val top-1, epochs."""
    table = ["| model | val top-1 (%) | epochs |", "|---|---|---|"]
    table += [f"| {r.model} | {'-' if r.top1 is None else f'{r.top1:.2f}'} | {'' if r.epochs is None else r.epochs} |"
              for r in rows]
    return "\n".join(table)


def plot_curves(runs: Mapping[str, str | Path], levels: Mapping[str, float], path: Path, title: str) -> Path:
    """Validation curves of ``runs`` (label -> run directory) and horizontal lines at ``levels``
    (label -> top-1: runs on other images or epochs, such as the teachers) -> the PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, run_dir in runs.items():
        rows = [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "val_top1" in r]
        if rows:
            ax.plot([r["epoch"] for r in rows], [r["val_top1"] for r in rows], marker="o", label=label)
    for i, (label, top1) in enumerate(levels.items()):
        ax.axhline(top1, color=f"C{len(runs) + i}", linestyle="--", linewidth=1, label=f"{label}: {top1:.2f}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
