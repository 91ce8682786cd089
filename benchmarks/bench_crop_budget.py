"""The crop budget study: what a cache of C crops per image costs against online MEAL V2.

Method, targets and sizing: docs/benchmarks.md, section bench_crop_budget.

    python -m benchmarks.bench_crop_budget                 # the study (~2 h on an idle 2-core CPU)
    python -m benchmarks.bench_crop_budget --smoke         # every run kind on tiny subsets (~1 min on 2 busy cores)
    python -m benchmarks.bench_crop_budget --jobs 2        # two runs at a time, one core each
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from benchmarks.bench_fashion_mnist import base_config
from benchmarks.harness import (
    REPO, add_device_args, add_quick_arg, begin, demo_parser, figure, ints, markdown_table, names, publish,
    report_head, run_header, run_main, run_steps, say,
)
from common.config import ConfigError, parse_assignments
from stage2_student_distill import experiment as ex

# this study's kinds of student run -> the driver's
DRIVER_KINDS = {"hard": "hard", "fresh": "online", "replay": "replay", "cached": "cached", "multicrop": "cached"}
KINDS = {"hard": "hard labels", "fresh": "online MEAL V2, fresh crops", "replay": "online MEAL V2, replaying the cache",
         "cached": "MEAL V2 from the cache", "multicrop": "MEAL V2 from the cache, multi-crop"}
SMOKE = {"train_images": 300, "val_images": 200, "teacher_epochs": 1, "student_epochs": 1, "budgets": "1,2",
         "multi_crop": 2, "batch_size": 50, "eval_every": 1}


# --------------------------------------------------------------------------- the record of finished work


class Ledger(dict):
    """WORKDIR/runs.jsonl: one JSON line per finished step (teacher, cache, student run), as a dict by ``key``."""

    def __init__(self, path: Path):
        lines = path.read_text().splitlines() if path.exists() else []
        super().__init__((row["key"], row) for row in map(json.loads, filter(str.strip, lines)))
        self.path = path

    def add(self, row: dict) -> dict:
        self[row["key"]] = row
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return row


# What every finished step in a workdir depends on; budgets, seeds and m may change between invocations (more runs).
SETTINGS = ("train_images", "val_images", "teachers", "teacher_epochs", "teacher_init", "student", "student_epochs",
            "img_size", "crop_scale", "topk", "batch_size", "lr", "weight_decay", "source")


def check_settings(ledger: Ledger, args) -> None:
    """Refuse to mix runs of two studies in one workdir (a rerun skips what runs.jsonl lists as finished)."""
    mine = {k: getattr(args, k) for k in SETTINGS}
    saved = ledger.get("settings")
    if saved is None:
        ledger.add({"key": "settings", **mine})
        return
    differ = [f"{k} {saved.get(k)!r} -> {mine[k]!r}" for k in SETTINGS if saved.get(k) != mine[k]]
    if differ:
        raise SystemExit(f"error: {ledger.path} holds a study with other settings ({'; '.join(differ)}): "
                         "pass a new --workdir, or the same settings to resume it")


def run_record(key: str, r: ex.RunRecord, **fields) -> dict:
    """A finished run's ledger row: last epoch's top-1, mean img/s, training wall time (sum over epochs, so
    a resumed run counts every epoch once), and the teachers' share of it for online runs."""
    return {"key": key, **fields, "run": r.run_dir, "epochs": r.epochs, "top1": r.top1, "curve": r.curve,
            "img_per_s": r.img_per_s, "wall_s": r.wall_s, "teacher_s": r.teacher_s}


# --------------------------------------------------------------------------- the study


def teacher_inits(args: argparse.Namespace | dict) -> dict[str, str]:
    """--teacher-init NAME=PATH as NAME -> PATH, from the parsed arguments or a payload's ``args``."""
    items = (args.get("teacher_init") if isinstance(args, dict) else args.teacher_init) or []
    return parse_assignments(items, "--teacher-init")


def parse_args(argv):
    p, _ = demo_parser(__doc__)
    add_quick_arg(p, f"every run kind on tiny subsets, 1 epoch (~1 min; {SMOKE})", "all output under WORKDIR")
    p.add_argument("--workdir", default=None,
                   help="data, runs, caches, runs.jsonl (kept; reruns resume; default runs/bench-crop-budget[-smoke])")
    p.add_argument("--train-images", type=int, default=60000, help="students' and teachers' training images")
    p.add_argument("--val-images", type=int, default=10000, help="test images scored")
    p.add_argument("--teachers", type=names, default="resnet10t,regnetx_002", help="comma list of timm names")
    p.add_argument("--teacher-epochs", type=int, default=4)
    p.add_argument("--teacher-init", action="append", default=None, metavar="NAME=PATH",
                   help="start teacher NAME from these weights (a `pipeline train` checkpoint), not random init: "
                        "--teacher-epochs more epochs of a fresh cosine schedule (a warm restart); repeatable")
    p.add_argument("--student", default="test_efficientnet")
    p.add_argument("--student-epochs", type=int, default=8, help="E: every student run's epochs")
    p.add_argument("--budgets", default="1,2,4,8,E", help="cached crops per image C (E = --student-epochs)")
    p.add_argument("--multi-crop", type=int, default=2, help="m of the multi-crop run (0 = none)")
    p.add_argument("--seeds", type=ints, default="0,1",
                   help="seeds of hard, fresh and the best cached (the first: all runs)")
    p.add_argument("--img-size", type=int, default=28, help="every model's input size")
    p.add_argument("--crop-scale", type=float, nargs=2, default=[0.64, 1.0], help="RandomResizedCrop area range")
    p.add_argument("--topk", type=int, default=10, help="classes kept per cached crop (10 = all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=5e-5)
    p.add_argument("--eval-every", type=int, default=0, help="epochs between validations (0: the last only)")
    p.add_argument("--min-margin", type=float, default=2.0,
                   help="points the ensemble must be above the hard-label student before distilling")
    p.add_argument("--ignore-margin", action="store_true", help="distil even when the ensemble misses --min-margin")
    add_device_args(p)
    p.add_argument("--out", default=None, help="JSON (default benchmarks/results/crop_budget.json)")
    p.add_argument("--doc", default=None, help="markdown file whose marked section is replaced ('' = none)")
    p.add_argument("--doc-tag", default="", help="which marked section of --doc")
    p.add_argument("--plot", default=None, help="PNG of top-1 against C (default docs/img/crop_budget.png)")
    p.add_argument("--jobs", type=int, default=1,
                   help="independent runs at a time, each in its own process (2 on a 2-core CPU: one core each)")
    p.add_argument("--step", default=None, help=argparse.SUPPRESS)  # one step, in a child of --jobs > 1
    args = p.parse_args(argv)
    if args.quick:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.ignore_margin = True
    wd = Path(args.workdir or f"runs/bench-crop-budget{'-smoke' if args.quick else ''}")
    args.workdir = str(wd)
    args.out = args.out or str(wd / "crop_budget.json" if args.quick else REPO / "benchmarks/results/crop_budget.json")
    args.doc = str(wd / "results.md") if args.quick and args.doc is None else (
        "docs/results.md" if args.doc is None else args.doc)
    tag = f"-{args.doc_tag}" if args.doc_tag else ""
    args.plot = args.plot or str(wd / "crop_budget.png" if args.quick else REPO / f"docs/img/crop_budget{tag}.png")
    E = args.student_epochs
    args.eval_every = args.eval_every or E
    args.budgets = sorted({E if b.strip() == "E" else int(b) for b in args.budgets.split(",") if b.strip()})
    args.num_crops = args.budgets[0]  # base_config's crops.num_crops; each cache sets its own
    try:
        inits = teacher_inits(args)
    except ConfigError as e:
        p.error(str(e))
    for name, path in inits.items():
        if name not in args.teachers:
            p.error(f"--teacher-init {name}={path}: {name} is not one of --teachers {args.teachers}")
        if not Path(path).is_file():
            p.error(f"--teacher-init {name}={path}: {path} is not a file")
    if not args.seeds or not args.budgets or min(args.budgets) < 1:
        p.error("--seeds and --budgets need at least one value each, budgets >= 1")
    if args.multi_crop and args.multi_crop > max(args.budgets):
        p.error(f"--multi-crop {args.multi_crop} needs a cache of at least as many crops (--budgets {args.budgets})")
    return args


def step_key(kind: str, seed: int, C: int | None = None, m: int = 1) -> str:
    """A student run's ledger key, e.g. ``cached:seed0:C4`` or ``multicrop:seed0:C8:m2``."""
    return f"{kind}:seed{seed}" + (f":C{C}" if C else "") + (f":m{m}" if m > 1 else "")


def parse_key(key: str) -> dict:
    """``step_key``'s inverse: {"kind", "seed", "C", "m"} (``teacher:NAME`` and ``cache:CN`` too)."""
    kind, *parts = key.split(":")
    if kind == "teacher":
        return {"kind": kind, "name": parts[0]}
    fields = {"kind": kind, "seed": None, "C": None, "m": 1}
    for part in parts:
        name = {"seed": "seed", "C": "C", "m": "m"}[part.rstrip("0123456789")]
        fields[name] = int(part[len(name):])
    return fields


class Study:
    """The study's steps (teachers, caches, student runs), each recorded in the ledger once finished."""

    def __init__(self, args, argv: list[str]):
        self.args, self.argv = args, argv
        self.wd = Path(args.workdir)
        self.ledger = Ledger(self.wd / "runs.jsonl")
        check_settings(self.ledger, args)
        manifests = ex.prepare_data(ex.FashionMnistData(args.source, str(self.wd / "data"), args.train_images,
                                                        args.val_images))
        self.val = manifests.val
        self.base = base_config(args, manifests)

    def teachers(self) -> ex.Teachers:
        """The trained teachers' best checkpoints."""
        return ex.Teachers.from_runs({n: self.ledger.get(f"teacher:{n}")["run"] for n in self.args.teachers})

    # ---- the steps

    def teacher(self, name: str) -> None:
        """Trained once with `pipeline train`, reused by every cache and online run."""
        a, run_dir = self.args, self.wd / f"teacher_{name}"
        init = teacher_inits(a).get(name, "")
        record = ex.train(self.base, ex.ModelRun("hard", name, run_dir, a.teacher_epochs,
                                                 overrides={"train.weights": init}), say)
        self.ledger.add(run_record(f"teacher:{name}", record, kind="teacher", model=name, init=init or None))

    def cache(self, C: int) -> None:
        """One cache per budget C; the first also scores the teachers and their ensemble on the test images."""
        a, path = self.args, self.wd / f"cache_C{C}"
        first = C == a.budgets[0]
        say(f"cache C = {C}: {C * a.train_images:,} crops through {', '.join(a.teachers)}")
        made = ex.build_cache(self.base, ex.CacheSpec(path, self.teachers(), self.val if first else "", {
            "crops.num_crops": C, "teacher_cache.topk": a.topk, "teacher_cache.batch_size": 256,
            # smoke teachers (1 epoch on a few hundred images) may sit at chance: stage 1 would refuse them
            **({"teacher_cache.min_top1_over_chance": 0.0} if a.quick else {})}))
        s = made.summary
        # a cache finished by an earlier, interrupted invocation reports only this one's shards
        self.ledger.add({"key": f"cache:C{C}", "kind": "cache", "C": C, "path": str(path), "crops": s["crops"],
                         "teacher_s": s["seconds"], "crops_per_s": s["crops_per_s"],
                         "complete_in_one_go": s["shards_skipped"] == 0, "bytes_on_disk": s["bytes_on_disk"],
                         "teacher_eval": made.evaluation if first else None})

    def student(self, kind: str, seed: int, C: int | None = None, m: int = 1) -> None:
        """One student run: ``kind`` in KINDS; C = the cache read (cached, multicrop) or replayed (replay)."""
        a, key = self.args, step_key(kind, seed, C, m)
        cache_path = self.ledger.get(f"cache:C{C}")["path"] if C else ""
        keys = {"runtime.seed": seed} if kind == "hard" else {"runtime.seed": seed, "distill.crops_per_image": m}
        epochs = max(1, a.student_epochs // m)
        run = ex.ModelRun(DRIVER_KINDS[kind], a.student, self.wd / key.replace(":", "_"), epochs, cache_path,
                          self.teachers() if kind in ("fresh", "replay") else None, keys)
        record = ex.train(self.base, run, say)
        self.ledger.add(run_record(key, record, kind=kind, seed=seed, C=C, m=m, jobs=a.jobs))

    def step(self, key: str) -> None:
        f = parse_key(key)
        if f["kind"] == "teacher":
            self.teacher(f["name"])
        elif f["kind"] == "cache":
            self.cache(f["C"])
        else:
            self.student(f["kind"], f["seed"], f["C"], f["m"])

    # ---- running them

    def run(self, keys: list[str]) -> list[dict]:
        """Finish the steps ``keys`` (independent of one another, ``run_steps``) and return their ledger rows."""
        run_steps([k for k in keys if self.ledger.get(k) is None], self.step, "benchmarks.bench_crop_budget",
                  self.argv, self.args.jobs, self.wd)
        self.ledger = Ledger(self.ledger.path)  # the children's rows
        rows = [self.ledger.get(k) for k in keys]
        for row in rows:
            if row.get("top1") is not None and row["kind"] != "teacher":
                say(f"{row['key']}: top-1 {row['top1']}")
        return rows


def check_margin(args, study: Study, hard: list[dict]) -> tuple[dict, float, float, bool]:
    """The first cache, which scores the teachers: the ensemble must know more than the hard labels, or
    distilling is not worth the time. (its evaluation, the ensemble's top-1, the margin, whether enough)"""
    evaluation = study.run([f"cache:C{args.budgets[0]}"])[0]["teacher_eval"]
    ensemble = ex.teacher_top1(evaluation).ensemble
    margin = ensemble - float(np.mean([r["top1"] for r in hard]))
    margin_ok = margin >= args.min_margin
    hard_top1 = ", ".join(f"{r['top1']:.2f}%" for r in hard)
    print(f"teacher ensemble {ensemble:.2f}% is {margin:+.2f} points from the hard-label student "
          f"({hard_top1}): {'enough' if margin_ok else 'NOT enough'} "
          f"(the study needs >= {args.min_margin})", flush=True)
    return evaluation, ensemble, margin, margin_ok


def students(args, study: Study) -> dict:
    """The other caches, then the students in the order the targets need them, so a study cut short has
    answered the most: cached C = E and online fresh (target 2), the other budgets (targets 1 and 3), the
    second online seed; then the best C again, online replaying the largest cache, multi-crop."""
    seeds, budgets = args.seeds, args.budgets
    caches = study.run([f"cache:C{C}" for C in budgets])
    big = max(budgets)
    order = [step_key("cached", seeds[0], big), step_key("fresh", seeds[0])]
    order += [step_key("cached", seeds[0], C) for C in budgets if C != big] + [step_key("fresh", s) for s in seeds[1:]]
    by_key = dict(zip(order, study.run(order)))
    cached = {C: by_key[step_key("cached", seeds[0], C)] for C in budgets}
    fresh = [by_key[step_key("fresh", s)] for s in seeds]
    best = max(budgets, key=lambda C: cached[C]["top1"])
    later = [step_key("cached", s, best) for s in seeds[1:]] + [step_key("replay", seeds[0], big)]
    if args.multi_crop > 1:
        later.append(step_key("multicrop", seeds[0], big, args.multi_crop))
    later_rows = study.run(later)
    return {"caches": caches, "cached": cached, "fresh": fresh, "best": best,
            "best_runs": [cached[best]] + later_rows[:len(seeds) - 1], "replay": later_rows[len(seeds) - 1],
            "multicrop": later_rows[len(seeds)] if args.multi_crop > 1 else None}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    t_start, info, wd = begin(args.workdir)
    study = Study(args, argv)
    if args.step:  # one step, as a child of an invocation with --jobs > 1
        study.step(args.step)
        return 0
    # 1. teachers and the hard-label students: independent of one another
    rows = study.run([f"teacher:{n}" for n in args.teachers] + [step_key("hard", s) for s in args.seeds])
    teachers, hard = dict(zip(args.teachers, rows)), rows[len(args.teachers):]
    # 2. is the ensemble worth distilling?
    evaluation, ensemble, margin, margin_ok = check_margin(args, study, hard)
    if not margin_ok and not args.ignore_margin:
        print(f"stopping: train stronger teachers (more --teacher-epochs in a new --workdir, or larger --teachers); "
              f"--ignore-margin distils anyway", file=sys.stderr)
        return 2
    # 3. the students from the caches, online and multi-crop
    st = students(args, study)
    runs = [*hard, *st["fresh"], st["replay"], *[st["cached"][C] for C in args.budgets], *st["best_runs"][1:],
            *([st["multicrop"]] if st["multicrop"] else [])]
    summary = summarize(args, ensemble, hard, st["fresh"], st["replay"], st["cached"], st["best"], st["best_runs"])
    summary.update(margin=margin, margin_ok=margin_ok)
    payload = {**run_header(args, t_start, info), "teachers": teachers, "teacher_eval": evaluation,
               "caches": st["caches"], "runs": runs, "summary": summary}
    plot(payload, Path(args.plot))
    say(f"plot: {args.plot}")
    publish("crop_budget", payload, args.out, report(payload), args.doc, args.doc_tag)
    return 0


def mean(rows) -> float:
    return float(np.mean([r["top1"] for r in rows]))


def summarize(args, ensemble, hard, fresh, replay, cached, best, best_runs) -> dict:
    """Issue 16 item 6's targets, on means over seeds where there are several."""
    h, f = mean(hard), mean(fresh)
    E = args.student_epochs
    close = [C for C in args.budgets if abs(cached[C]["top1"] - f) <= 0.3]
    return {
        "ensemble_top1": ensemble, "hard_top1": h, "fresh_top1": f, "replay_top1": replay["top1"],
        "best_C": best, "best_cached_top1": mean(best_runs),
        "best_cached_minus_hard": mean(best_runs) - h, "met_kd": mean(best_runs) - h >= 0.5,
        "cached_E_minus_fresh": cached[E]["top1"] - f if E in cached else None,
        "met_online": E in cached and abs(cached[E]["top1"] - f) <= 0.3,
        "smallest_C_within_0.3_of_fresh": min(close) if close else None,
    }


# --------------------------------------------------------------------------- report


def plot(payload: dict, path: Path) -> None:
    runs, s = payload["runs"], payload["summary"]
    cached = sorted((r["C"], r["top1"]) for r in runs if r["kind"] == "cached")
    with figure(path, (6, 4), dpi=110) as ax:
        ax.plot([c for c, _ in cached], [t for _, t in cached], "o", color="C0",
                label="MEAL V2 from a cache of C crops")
        by_c = {}
        for c, t in cached:
            by_c.setdefault(c, []).append(t)
        ax.plot(sorted(by_c), [np.mean(by_c[c]) for c in sorted(by_c)], "-", color="C0")
        for r in runs:
            if r["kind"] == "multicrop":
                ax.plot([r["C"]], [r["top1"]], "s", color="C3", label=f"multi-crop m = {r['m']} (C = {r['C']})")
            if r["kind"] == "replay":
                ax.plot([r["C"]], [r["top1"]], "^", color="C4", label=f"online, replaying the C = {r['C']} cache")
        ax.axhline(s["fresh_top1"], color="C2", ls="--", label="online MEAL V2, fresh crops")
        ax.axhline(s["hard_top1"], color="C7", ls=":", label="hard labels")
        # what the soft labels know: a distilled student ends near this line, whatever C
        ax.axhline(s["ensemble_top1"], color="C1", ls="-.", label="the teachers' ensemble (centre crop)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(by_c), [str(c) for c in sorted(by_c)])
        ax.set_xlabel("C: cached crops per training image")
        ax.set_ylabel("top-1 on the test images (%)")
        a = payload["args"]
        ax.set_title(f"{a['student']}, {a['student_epochs']} epochs, {a['train_images']:,} images", fontsize=10)
        ax.legend(fontsize=7, loc="best")


def total_minutes(payload: dict) -> float:
    """Teachers' and students' epochs plus the caches' teacher passes, as recorded (resumed runs count once)."""
    seconds = sum(r["wall_s"] for r in [*payload["teachers"].values(), *payload["runs"]])
    return (seconds + sum(c["teacher_s"] for c in payload["caches"])) / 60


def report(payload: dict) -> str:
    a, s, ev = payload["args"], payload["summary"], payload["teacher_eval"]
    teacher_top1 = ", ".join(f"{n} {top1:.2f}%" for n, top1 in ex.teacher_top1(ev).teachers.items())
    lines = [
        *report_head(payload, "### Crop budget study", f"; wall time {payload['minutes']:.1f} min in this invocation, "
                     f"{total_minutes(payload):.1f} min of training and caching recorded over all invocations."),
        f"* **Data**: students and teachers on {a['train_images']:,} training images, scored on "
        f"{a['val_images']:,} test images at {a['img_size']} px; crop scale {a['crop_scale']}, top-{a['topk']} kept.",
        f"* **Teachers**: {', '.join(a['teachers'])}, {a['teacher_epochs']} epochs each (`pipeline train`"
        + "".join(f"; {name} started from {path}" for name, path in teacher_inits(a).items()) + "): "
        f"{teacher_top1}; ensemble {s['ensemble_top1']:.2f}%, {s['margin']:+.2f} points from the hard-label "
        f"student ({'>=' if s['margin_ok'] else 'below'} the {a['min_margin']} the study needs).",
        f"* **Students**: {a['student']}, {a['student_epochs']} epochs (multi-crop: E / m), batch "
        f"{a['batch_size']}, SGD lr {a['lr']} cosine, weight decay {a['weight_decay']}; seeds {a['seeds']}"
        + (f"; {a['jobs']} runs at a time, so img/s and wall s are those of a run sharing the machine with "
           f"another." if a.get("jobs", 1) > 1 else "."),
        "",
    ]
    # top-1 to 2 decimals: the targets are 0.3 and 0.5 points
    rows = [{"run": KINDS[r["kind"]], "C": r["C"] if r["C"] else "", "m": r["m"], "seed": r["seed"],
             "epochs": r["epochs"], "top1": f"{r['top1']:.2f}", "img_s": r["img_per_s"], "wall": r["wall_s"],
             "teacher": r["teacher_s"] if r["teacher_s"] is not None else ""} for r in payload["runs"]]
    lines.append(markdown_table(rows, [("run", "student"), ("C", "C"), ("m", "m"), ("seed", "seed"),
                                       ("epochs", "epochs"), ("top1", "top-1 (%)"), ("img_s", "student img/s"),
                                       ("wall", "wall s"), ("teacher", "of which teachers s")]))
    lines += ["", "The teachers, trained once (`pipeline train`, hard labels, the students' images and recipe):", ""]
    lines.append(markdown_table(
        [{"model": r["model"], "epochs": r["epochs"], "top1": f"{r['top1']:.2f}", "img_s": r["img_per_s"],
          "wall": r["wall_s"]} for r in payload["teachers"].values()],
        [("model", "teacher"), ("epochs", "epochs"), ("top1", "top-1 (%)"), ("img_s", "train img/s"),
         ("wall", "wall s")]))
    lines += ["", "One-off teacher cost of each cache (stage 1, without its evaluation of the teachers):", ""]
    lines.append(markdown_table(
        [{"C": c["C"], "crops": c["crops"], "s": c["teacher_s"], "rate": c["crops_per_s"],
          "mb": c["bytes_on_disk"] / 2**20 if c["bytes_on_disk"] else None,
          "note": "" if c["complete_in_one_go"] else "resumed: this invocation's share"} for c in payload["caches"]],
        [("C", "C"), ("crops", "crops"), ("s", "teacher s"), ("rate", "crops/s"), ("mb", "MiB on disk"),
         ("note", "")]))
    e_fresh = s["cached_E_minus_fresh"]
    lines += ["", "| target | measured | met |", "|---|---|---|",
              f"| best cached (C = {s['best_C']}, mean of {len(a['seeds'])} seeds) - hard labels >= +0.5 | "
              f"{s['best_cached_minus_hard']:+.2f} | {'yes' if s['met_kd'] else 'NO'} |",
              f"| abs(cached C = E - online fresh) <= 0.3 | "
              f"{'n/a' if e_fresh is None else f'{e_fresh:+.2f}'} | {'yes' if s['met_online'] else 'NO'} |",
              f"| smallest C within 0.3 of online fresh | {s['smallest_C_within_0.3_of_fresh'] or 'none'} | - |",
              "", f"Cached runs other than the best C have seed {a['seeds'][0]} only; hard labels, online fresh and "
              "the best C are means over the seeds.",
              "", f"![top-1 against C]({os.path.relpath(a['plot'], Path(a['doc'] or '.').resolve().parent)})"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_main(main)
