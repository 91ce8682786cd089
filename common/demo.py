"""`pipeline demo`: the whole pipeline on Fashion-MNIST, CPU-only, driven by [demo].

Steps (each skipped when its output is already complete, so a rerun resumes):
  1. Fashion-MNIST idx files -> PNG ImageFolder trees (class-balanced subsets):
     the students' training subset, the teachers' training set, the test subset
  2. manifests for train and test
  3. two teachers of different architectures trained on hard labels
     (on ``teacher_train_images`` images: all 60,000 by default; the students
     learn from ``train_images``, 1,000 by default: docs/results.md says why)
  4. `teacher-cache` over both teachers (and their evaluation on the test set)
  5. `distill` of a small student from the cache (MEAL V2: KL + discriminator)
  6. the same student on hard labels for the same epochs (the baseline)
  7. a results table (results.md / results.json) and a plot of validation curves

Expected with the shipped [demo] settings (seed 0; about 7 minutes on an idle
2-core CPU): teachers test_resnet 87.4% and test_byobnet 84.3%, ensemble 87.0%;
student test_efficientnet 81.0% with MEAL V2 vs. 78.9% on hard labels, on the
10,000 test images. docs/results.md has the seeds, the online-KD comparison
and why the students learn from a 1,000-image subset.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import click

from common.atomic import atomic_write_bytes, atomic_write_json
from common.cli_support import resolve_config, user_errors
from common.config import Config
from stage2_student_distill.metrics import read_metrics


def _say(msg: str) -> None:
    click.echo(click.style(f"[demo] {msg}", fg="cyan"), err=True)


def _final_top1(run_dir: Path) -> float | None:
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "val_top1" in r]
    return rows[-1]["val_top1"] if rows else None


@contextlib.contextmanager
def _timed(steps: dict[str, float], name: str):
    """Record the wall seconds of the ``with`` body as ``steps[name]`` (results.json)."""
    start = time.time()
    yield
    steps[name] = time.time() - start


def _started(run_dir: Path) -> bool:
    """Resume a step that already wrote a checkpoint (a rerun of the demo continues)."""
    return (run_dir / "last.pt").exists()


def _shared_overrides(d) -> dict:
    """Settings every demo stage shares: small images, small batches, a gentler crop scale.

    28 x 28 garments survive only mild cropping: the ImageNet scale range
    (0.08, 1) would often leave a few pixels of background.
    """
    return {
        "optim.img_size": d.img_size,
        "optim.batch_size": d.batch_size,
        "optim.eval_batch_size": d.eval_batch_size,
        "optim.eval_every": d.eval_every,
        "optim.lr": d.lr,
        "optim.schedule": d.schedule,
        "optim.weight_decay": d.weight_decay,
        "optim.loader": d.loader,
        "crops.num_crops": d.num_crops,
        "crops.scale": list(d.crop_scale),
    }


def run(cfg: Config) -> dict:
    from data_manifests.fashion_mnist import subset_manifest
    from stage1_teacher_cache.run import run as run_teacher_cache
    from stage2_student_distill.train import run_distill, run_train

    d = cfg.demo
    teacher_images = d.teacher_train_images or d.train_images
    out = Path(d.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    steps: dict[str, float] = {}  # wall seconds per step, in results.json
    _say(
        f"Fashion-MNIST at {d.img_size}px, scored on {d.val_images} test images. Teachers "
        f"{', '.join(d.teachers)} x {d.teacher_epochs} epochs on {teacher_images} training images; their ensemble "
        f"cached on {d.num_crops} crops (area {d.crop_scale[0]:g}-{d.crop_scale[1]:g}) of each of the students' "
        f"{d.train_images} training images; student {d.student} x {d.student_epochs} epochs, once with MEAL V2 "
        f"(cached KD) and once on hard labels, same images and epochs. Change these in pipeline.toml [demo]."
    )
    if teacher_images > d.train_images:
        _say(f"the teachers learn from {teacher_images} images, the students from {d.train_images}: distillation "
             "pays where the student has few labelled images and the teachers know more than those labels say "
             "(with teachers trained on the students' own images it loses to hard labels; docs/results.md)")

    _say("1/7 preparing images")
    with _timed(steps, "1-2 images and manifests"):
        manifests = {
            key: subset_manifest(d.source_dir, d.data_dir, split, images, cfg.runtime.progress)
            for key, split, images in (("train", "train", d.train_images), ("teacher_train", "train", teacher_images),
                                       ("test", "test", d.val_images))
        }
    _say("2/7 manifests ready")

    base = cfg.replace(**_shared_overrides(d), **{"data.manifest": manifests["train"], "data.val_manifest": manifests["test"]})

    teacher_runs = {}
    for i, name in enumerate(d.teachers):
        run_dir = out / f"teacher_{name}"
        _say(f"3/7 training teacher {i + 1}/{len(d.teachers)}: {name} ({d.teacher_epochs} epochs on "
             f"{teacher_images} images) -> {run_dir}")
        with _timed(steps, f"3 teacher {name}"):
            run_train(base.replace(**{"data.manifest": manifests["teacher_train"], "train.model": name,
                                      "train.out": str(run_dir), "train.resume": _started(run_dir),
                                      "optim.epochs": d.teacher_epochs}))
        teacher_runs[name] = run_dir

    cache_dir = out / "cache"
    _say(f"4/7 caching the ensemble's soft labels -> {cache_dir}")
    ccfg = base.replace(**{
        "teacher_cache.teachers": list(d.teachers),
        "teacher_cache.teacher_weights": [f"{n}={teacher_runs[n] / 'best.pt'}" for n in d.teachers],
        "teacher_cache.pretrained": False,
        "teacher_cache.out": str(cache_dir),
        "teacher_cache.evaluate_manifest": manifests["test"],
        "teacher_cache.batch_size": d.cache_batch_size,
    })
    with _timed(steps, "4 teacher cache"):
        cache_summary = run_teacher_cache(ccfg)

    student_runs = {"MEAL V2 (cached KD)": out / "student_mealv2", "hard labels": out / "student_hard"}
    _say(f"5/7 distilling {d.student} from the cache ({d.student_epochs} epochs)")
    mealv2_dir, hard_dir = student_runs.values()
    with _timed(steps, "5 student, MEAL V2"):
        run_distill(base.replace(**{"distill.student": d.student, "distill.cache": str(cache_dir),
                                    "distill.out": str(mealv2_dir), "distill.resume": _started(mealv2_dir),
                                    "optim.epochs": d.student_epochs}))
    _say(f"6/7 training {d.student} on hard labels ({d.student_epochs} epochs), the baseline")
    with _timed(steps, "6 student, hard labels"):
        run_train(base.replace(**{"train.model": d.student, "train.out": str(hard_dir),
                                  "train.resume": _started(hard_dir), "optim.epochs": d.student_epochs}))

    _say("7/7 results")
    teacher_eval = (cache_summary or {}).get("teacher_eval") or {}
    rows = []
    for name, run_dir in teacher_runs.items():
        rows.append((f"teacher {name} ({teacher_images} training images)", _final_top1(run_dir), d.teacher_epochs))
    if "ensemble" in teacher_eval:
        # the cache records accuracies as fractions; the training runs as percentages
        rows.append(("teacher ensemble (mean softmax)", 100 * teacher_eval["ensemble"]["top1"], None))
    for label, run_dir in student_runs.items():
        rows.append((f"student {d.student}, {label}", _final_top1(run_dir), d.student_epochs))
    table = ["| model | val top-1 (%) | epochs |", "|---|---|---|"]
    table += [f"| {n} | {'-' if a is None else f'{a:.2f}'} | {'' if e is None else e} |" for n, a, e in rows]
    text = "\n".join(table)
    mealv2, hard = (_final_top1(p) for p in student_runs.values())
    gain = None if mealv2 is None or hard is None else mealv2 - hard
    if gain is not None:
        text += (f"\n\nMEAL V2 - hard labels: {gain:+.2f} points top-1, {d.student_epochs} epochs each on the same "
                 f"{d.train_images} images (the demo's aim: >= +0.5; docs/results.md)")
    # the teachers train on other images for other epochs: their final accuracy is a level, not a curve
    levels = {n: a for n, a, e in rows[: len(rows) - len(student_runs)] if a is not None}
    plot = _plot_curves({f"student, {k}": p for k, p in student_runs.items()}, levels, out / "val_curves.png")
    result = {"rows": [{"model": n, "top1": a, "epochs": e} for n, a, e in rows],
              "mealv2_minus_hard": gain,
              "minutes": round((time.time() - t0) / 60, 2), "step_seconds": {k: round(v, 1) for k, v in steps.items()},
              "plot": str(plot) if plot else None, "config": cfg.to_dict()}
    atomic_write_json(out / "results.json", result)
    atomic_write_bytes(out / "results.md", (text + "\n").encode())
    click.echo(text)
    click.echo(f"\nplot: {plot}\nfinished in {result['minutes']} min; results in {out}/results.md")
    return result


def _plot_curves(runs: dict[str, Path], levels: dict[str, float], path: Path) -> Path | None:
    """Validation curves of ``runs`` and horizontal lines at the ``levels`` (the teachers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, run_dir in runs.items():
        rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "val_top1" in r]
        if rows:
            ax.plot([r["epoch"] for r in rows], [r["val_top1"] for r in rows], marker="o", label=label)
    for i, (label, top1) in enumerate(levels.items()):
        ax.axhline(top1, color=f"C{len(runs) + i}", linestyle="--", linewidth=1, label=f"{label}: {top1:.2f}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_title("Fashion-MNIST: teachers, MEAL V2 student, hard-label student")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@click.command("demo")
@click.option("--out", default=None, help="Run directory (demo.out).")
@click.option("--train-images", type=int, default=None, help="Training subset size (demo.train_images).")
@click.option("--val-images", type=int, default=None, help="Test subset size (demo.val_images).")
@click.pass_context
def demo_command(ctx, out, train_images, val_images):
    """Run the whole pipeline on Fashion-MNIST (the embedded default) and print a results table."""
    cfg = resolve_config(ctx, {"demo.out": out, "demo.train_images": train_images, "demo.val_images": val_images})
    with user_errors():
        run(cfg)
