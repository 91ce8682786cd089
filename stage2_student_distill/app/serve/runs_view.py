"""The Runs page: validation curves of run directories on one plot, and the config keys that differ.

A run directory is one with a ``metrics.jsonl`` (``stage2_student_distill.metrics``);
each ``--runs DIR`` is a run itself or holds runs as subdirectories. Requests name
runs by the names listed here; a name is looked up in this listing, never joined
to a path, so no request can reach a file outside the served directories.
"""
from __future__ import annotations

import io
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

# The nearest library reader of RUN/metrics.jsonl (one implementation for train, resume and here).
from stage2_student_distill.checkpoint import flatten_config
from stage2_student_distill.metrics import read_metrics
from stage2_student_distill.train import result_tables

METRICS = "metrics.jsonl"
CONFIG = "config.json"
# Keys that differ between any two runs by construction (where each run writes), not by choice.
_OWN_PATH_KEYS = frozenset({"distill.out", "train.out"})
_PLOT_LOCK = threading.Lock()  # matplotlib's global state (rcParams, font cache) is not thread-safe


@dataclass(frozen=True)
class Run:
    name: str
    path: Path
    metrics: list[dict[str, Any]]
    config: dict[str, Any]  # flattened: "table.key" -> value, only the tables its command reads
    error: str | None = None  # why its files could not be read (the run is listed with it)


def discover(roots: Sequence[Path]) -> dict[str, Path]:
    """name -> run directory, for every root that is a run and every run directly inside a root."""
    found: dict[str, Path] = {}
    for root in roots:
        root = Path(root)
        dirs = [root] if (root / METRICS).is_file() else sorted(
            p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and (p / METRICS).is_file())
        for d in dirs:
            name = d.name if d.name not in found else f"{d.parent.name}/{d.name}"
            found[name] = d
    return found


def load_run(name: str, path: Path) -> Run:
    try:
        metrics = read_metrics(path / METRICS)
        config_file = path / CONFIG
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        if not isinstance(config, dict) or not all(isinstance(t, dict) for t in config.values()):
            raise ValueError("not a table of tables")
    except (ValueError, OSError) as e:  # json.JSONDecodeError is a ValueError
        return Run(name, path, [], {}, f"{path}: cannot read {METRICS}/{CONFIG} ({e})")
    return Run(name, path, metrics, meaningful(config))


def meaningful(config: dict[str, Any]) -> dict[str, Any]:
    """The flattened keys of the tables the run's command reads: a train run's config.json also holds
    [distill]'s defaults, which say nothing about it (and the other way round). Online distill runs
    read their teachers from [teacher_cache]."""
    tables = result_tables(config)
    if (config.get("distill") or {}).get("online") and "distill" in tables:
        tables += ("teacher_cache",)
    return flatten_config(config, tables)


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose values are not the same in every run (a key missing from one run differs)."""
    if len(runs) < 2:
        return []
    keys = sorted(set().union(*(r.config for r in runs)) - _OWN_PATH_KEYS)
    missing = object()
    return [k for k in keys if len({json.dumps(r.config.get(k, missing), default=repr) for r in runs}) > 1]


def plot_svg(runs: Sequence[Run]) -> str | None:
    """Validation top-1 and loss per epoch, one line per run, as an inline SVG (None: nothing to plot)."""
    series = [(r, [m for m in r.metrics if "val_top1" in m]) for r in runs]
    if not any(rows for _, rows in series):
        return None
    import matplotlib
    from matplotlib.figure import Figure

    with _PLOT_LOCK, matplotlib.rc_context({"svg.fonttype": "none", "font.size": 10}):
        fig = Figure(figsize=(10, 3.8), layout="constrained")
        top1, loss = fig.subplots(1, 2)
        for run, rows in series:
            if not rows:
                continue
            epochs = [m["epoch"] for m in rows]
            line, = top1.plot(epochs, [m["val_top1"] for m in rows], marker="o", label=run.name)
            loss_rows = [m for m in rows if "val_loss" in m]
            loss.plot([m["epoch"] for m in loss_rows], [m["val_loss"] for m in loss_rows], marker="o",
                      color=line.get_color(), label=run.name)
        losses = [m["val_loss"] for _, rows in series for m in rows if m.get("val_loss", 0) > 0]
        log = bool(losses) and max(losses) > 10 * min(losses)  # early epochs would flatten the rest
        if log:
            loss.set_yscale("log")
        top1.set(title="validation top-1 (%)", xlabel="epoch")
        loss.set(title="validation loss (cross entropy" + (", log scale)" if log else ")"), xlabel="epoch")
        for ax in (top1, loss):
            ax.grid(alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
        top1.legend(loc="lower right", fontsize=9)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    svg = buf.getvalue()
    return svg[svg.index("<svg"):].strip()  # drop the XML prolog and doctype: it is embedded in HTML


def runs_page(roots: Sequence[Path], selected: Sequence[str]) -> dict[str, Any]:
    """Everything the Runs template shows; ``selected`` names runs (all when empty)."""
    available = discover(roots)
    unknown = [n for n in selected if n not in available]
    names = [n for n in selected if n in available] or ([] if unknown else list(available))
    runs = [load_run(n, available[n]) for n in names]
    readable = [r for r in runs if r.error is None]
    keys = differing_keys(readable)
    return {
        "available": list(available),
        "selected": names,
        "unknown": unknown,
        "runs": runs,
        "errors": [r.error for r in runs if r.error],
        "differing": [(k, [r.config.get(k, "—") for r in readable]) for k in keys],
        "readable": readable,
        "svg": plot_svg(readable),
        "last": {r.name: ([m for m in r.metrics if "val_top1" in m] or [None])[-1] for r in readable},
    }
