"""`pipeline demo`: the whole pipeline on Fashion-MNIST, CPU-only, driven by [demo] and stage2_student_distill/app/demo.toml.

Steps (each skipped when its output is already complete, so a rerun resumes):
  1. Fashion-MNIST idx files -> PNG ImageFolder trees (class-balanced subsets):
     the students' training subset, the teachers' training set, the test subset
  2. manifests for train and test
  3. two teachers of different architectures trained on hard labels
     (on ``teacher_train_images`` images: all 60,000 by default; the students
     learn from ``train_images``, 1,000 by default: docs/results.md says why)
  4. a short hard-label run of the student (a quarter of its epochs): with the
     ensemble's top-1, the figure that says whether distilling should pay
  5. `teacher-cache` over both teachers (their evaluation on the test set and
     the measured rule's advice first: docs/teachers.md)
  6. `distill` of a small student from the cache (MEAL V2: KL + discriminator)
  7. the same student on hard labels for the same epochs (the baseline)
  8. a results table (results.md / results.json) and a plot of validation curves

Expected with the shipped settings (seed 0; about 7 minutes on an idle
2-core CPU): teachers test_resnet 87.4% and test_byobnet 84.3%, ensemble 87.0%;
student test_efficientnet 81.0% with MEAL V2 vs. 78.9% on hard labels, on the
10,000 test images; the short run 76.0%, 11.0 points under the ensemble, so
the measured rule expects distilling to pay. docs/results.md has the seeds, the online-KD comparison
and why the students learn from a 1,000-image subset.
"""
from __future__ import annotations

import time
from pathlib import Path

import click

from common.atomic import atomic_write_bytes, atomic_write_json
from common.cli_support import config_options, resolve_config, user_errors
from common.config import Config, load_config

# The demo's training settings: a partial config laid over pipeline.toml, like a recipe (under --recipe and --set)
DEMO_SETTINGS = Path(__file__).resolve().parent / "demo.toml"


def demo_config(path: str | Path | None = None, overrides: dict | None = None) -> Config:
    """The config `pipeline demo` starts from: ``path`` (default pipeline.toml) <- stage2_student_distill/app/demo.toml <- ``overrides``."""
    return load_config(path, overrides, layers=(DEMO_SETTINGS,))


def _say(msg: str) -> None:
    click.echo(click.style(f"[demo] {msg}", fg="cyan"), err=True)


def run(cfg: Config) -> dict:
    # the driver is stage 2's (it calls both stages), which common/ imports only when the command runs
    from common.cache_format import CacheReader
    from stage1_teacher_cache import distill_advice
    from stage1_teacher_cache.teacher_eval import ensemble_warnings
    from stage2_student_distill import experiment as ex

    d, crops = cfg.demo, cfg.crops
    teacher_images = d.teacher_train_images or d.train_images
    out = Path(d.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    steps: dict[str, float] = {}  # wall seconds per step, in results.json
    _say(
        f"Fashion-MNIST at {cfg.optim.img_size}px, scored on {d.val_images} test images. Teachers "
        f"{', '.join(d.teachers)} x {d.teacher_epochs} epochs on {teacher_images} training images; their ensemble "
        f"cached on {crops.num_crops} crops (area {crops.scale[0]:g}-{crops.scale[1]:g}) of each of the students' "
        f"{d.train_images} training images; student {d.student} x {d.student_epochs} epochs, once with MEAL V2 "
        f"(cached KD) and once on hard labels, same images and epochs. Change these in pipeline.toml [demo] "
        f"and {DEMO_SETTINGS.name} (or with --set)."
    )
    if teacher_images > d.train_images:
        _say(f"the teachers learn from {teacher_images} images, the students from {d.train_images}: distillation "
             "pays where the student has few labelled images and the teachers know more than those labels say "
             "(with teachers trained on the students' own images it loses to hard labels; docs/results.md)")

    _say("1/8 preparing images")
    manifests, steps["1-2 images and manifests"], _ = ex.timed(ex.prepare_data, ex.FashionMnistData(
        d.source_dir, d.data_dir, d.train_images, d.val_images, teacher_images, cfg.runtime.progress))
    _say("2/8 manifests ready")

    base = cfg.replace(**{"data.manifest": manifests.train, "data.val_manifest": manifests.val})

    teacher_runs = {}
    for i, name in enumerate(d.teachers):
        run_dir = out / f"teacher_{name}"
        _say(f"3/8 training teacher {i + 1}/{len(d.teachers)}: {name} ({d.teacher_epochs} epochs on "
             f"{teacher_images} images) -> {run_dir}")
        record = ex.train(base, ex.ModelRun("hard", name, run_dir, d.teacher_epochs,
                                            overrides={"data.manifest": manifests.teacher_train}))
        steps[f"3 teacher {name}"] = record.seconds or 0.0
        teacher_runs[name] = record

    short_epochs = distill_advice.short_epochs(d.student_epochs)
    _say(f"4/8 a short hard-label run of {d.student} ({short_epochs} epochs, a quarter of the students'): with "
         "the ensemble's top-1 it tells whether distilling should pay, before the cache is built (docs/teachers.md)")
    short = ex.train(base, ex.ModelRun("hard", d.student, out / "student_short", short_epochs))
    steps["4 student, short hard-label run"] = short.seconds or 0.0
    base = base.replace(**{"distill.hard_label_top1": short.top1 or 0.0})

    cache_dir = out / "cache"
    _say(f"5/8 caching the ensemble's soft labels -> {cache_dir}")
    teachers = ex.Teachers.from_runs({name: r.run_dir for name, r in teacher_runs.items()})
    cache = ex.build_cache(base, ex.CacheSpec(cache_dir, teachers, manifests.val))
    steps["5 teacher cache"] = cache.seconds
    # The demo goes on whatever stage 1 advised: it trains both students, so its table shows which way it went.
    if ensemble_warnings(cache.evaluation or {}):
        _say("the teacher warning above is expected: the demo keeps both teachers to show an ensemble of two "
             "architectures; for a real run, drop the weaker one or train it longer (docs/teachers.md)")
    advice = distill_advice.advise_from_cache(CacheReader(cache.path).attrs, short.top1, d.student_epochs)
    if advice.verdict == "gain":
        _say(f"the ensemble is {advice.features['margin']:+.2f} points above the short run: over the measured rule's "
             f"threshold ({distill_advice.MEASURED_RULE}), so distilling is expected to pay (docs/teachers.md)")
    elif advice.verdict == "loss":
        _say(f"the distilling warning above is the measured rule's call (margin {advice.features['margin']:+.2f} "
             "points); the demo goes on and trains both students, so its table shows whether this regime is one of "
             "the rule's misses (docs/teachers.md lists them)")

    _say(f"6/8 distilling {d.student} from the cache ({d.student_epochs} epochs)")
    mealv2 = ex.train(base, ex.ModelRun("cached", d.student, out / "student_mealv2", d.student_epochs, str(cache_dir)))
    steps["6 student, MEAL V2"] = mealv2.seconds or 0.0
    _say(f"7/8 training {d.student} on hard labels ({d.student_epochs} epochs), the baseline")
    hard = ex.train(base, ex.ModelRun("hard", d.student, out / "student_hard", d.student_epochs))
    steps["7 student, hard labels"] = hard.seconds or 0.0
    students = {"MEAL V2 (cached KD)": mealv2, "hard labels": hard}

    _say("8/8 results")
    rows = [ex.ResultRow(f"teacher {name} ({teacher_images} training images)", r.top1, d.teacher_epochs)
            for name, r in teacher_runs.items()]
    ensemble = ex.teacher_top1(cache.evaluation).ensemble
    if ensemble is not None:
        rows.append(ex.ResultRow("teacher ensemble (mean softmax)", ensemble, None))
    # the teachers train on other images for other epochs: their final accuracy is a level, not a curve
    levels = {r.model: r.top1 for r in rows if r.top1 is not None}
    rows += [ex.ResultRow(f"student {d.student}, {label}", r.top1, d.student_epochs) for label, r in students.items()]
    rows.append(ex.ResultRow(f"student {d.student}, hard labels, short run (the advice's figure)", short.top1,
                             short_epochs))
    text = ex.results_table(rows)
    gain = None if mealv2.top1 is None or hard.top1 is None else mealv2.top1 - hard.top1
    if gain is not None:
        text += (f"\n\nMEAL V2 - hard labels: {gain:+.2f} points top-1, {d.student_epochs} epochs each on the same "
                 f"{d.train_images} images (the demo's aim: >= +0.5; docs/results.md)")
    plot = ex.plot_curves({f"student, {k}": r.run_dir for k, r in students.items()}, levels, out / "val_curves.png",
                          "Fashion-MNIST: teachers, MEAL V2 student, hard-label student")
    result = {"rows": [{"model": r.model, "top1": r.top1, "epochs": r.epochs} for r in rows],
              "mealv2_minus_hard": gain,
              "minutes": round((time.time() - t0) / 60, 2), "step_seconds": {k: round(v, 1) for k, v in steps.items()},
              "plot": str(plot), "config": cfg.to_dict()}
    atomic_write_json(out / "results.json", result)
    atomic_write_bytes(out / "results.md", (text + "\n").encode())
    click.echo(text)
    click.echo(f"\nplot: {plot}\nfinished in {result['minutes']} min; results in {out}/results.md")
    return result


@click.command("demo")
@config_options({"--out": ("demo.out", dict(help="Run directory.")),
                 "--train-images": ("demo.train_images", dict(type=int, help="Training subset size.")),
                 "--val-images": ("demo.val_images", dict(type=int, help="Test subset size."))})
@click.pass_context
def demo_command(ctx, **flags):
    """Run the whole pipeline on Fashion-MNIST (the embedded default) and print a results table."""
    cfg = resolve_config(ctx, flags, layers=(DEMO_SETTINGS,))
    with user_errors():
        run(cfg)
