"""Kill -9 `pipeline teacher-cache` at random moments, resume, and compare with an uninterrupted run.

Run by hand (slow: every process imports torch); the result goes into docs/reliability.md:

    /tmp/venv/bin/python tests/fault_kill_resume.py --kills 20            # real CLI processes
    /tmp/venv/bin/python tests/fault_kill_resume.py --kills 200 --mode fork  # many kills, fast

A trial starts a fresh cache, kills the writer ``--kills-per-trial`` times (each
restart resumes the previous one), then lets a last run finish; trials go on
until ``--kills`` kills have landed. A kill moment is drawn so that kills spread
evenly over the run's progress whatever the machine's speed: a number of
complete shards j (uniform over 0..S-1), then a delay uniform over one shard's
time after the j-th shard record appears (the shard time measured on the
uninterrupted run). After each trial the arrays must equal the uninterrupted
run's bit for bit and `verify` must find nothing.

``--mode cli`` runs ``pipeline --config C teacher-cache`` in a fresh interpreter;
``--mode fork`` forks this process (no import cost, same code path from run()
on). Forked children run torch single-threaded (an OpenMP pool does not survive
fork), so in fork mode the reference is computed the same way.

``--grow`` kills ``teacher-cache --more-crops 1`` instead, growing a copy of a
complete 2-crop cache to 3 crops (kills land in the shard loop of the staging
cache ``grow/`` or in the final swap); the reference is a 3-crop cache built
from scratch, so each trial checks that a killed and resumed grow equals it.

tests/test_faults.py runs a 2-kill fork-mode trial in the test suite.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import shutil

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from common.cache_format import CacheReader, verify_cache  # noqa: E402
from common.config import load_config  # noqa: E402
from stage1_fixtures import SIZES, make_manifest, overrides  # noqa: E402
from stage1_teacher_cache.run import run  # noqa: E402  (imported before forking: children start warm)

ARRAYS = ("boxes", "flip", "topk_index", "topk_prob")


def config_toml(settings: dict) -> str:
    """Flat TABLE.KEY overrides as a TOML file (JSON scalars and string lists are valid TOML)."""
    tables: dict[str, list[str]] = {}
    for key, value in settings.items():
        table, name = key.split(".", 1)
        tables.setdefault(table, []).append(f"{name} = {json.dumps(value)}")
    return "\n".join(f"[{t}]\n" + "\n".join(lines) + "\n" for t, lines in tables.items())


def _forked_run(config_file: Path, env: dict[str, str], more_crops: int = 0) -> None:
    import gc

    import torch

    # Objects inherited from the parent are never collected here: under pytest the parent may hold
    # unreachable DALI pipelines of earlier tests, whose destructor aborts in a child without their threads.
    gc.freeze()

    torch.set_num_threads(1)  # the parent's OpenMP pool is gone in a forked child
    os.environ.update(env)
    run(load_config(config_file), more_crops=more_crops)


class Writer:
    """One teacher-cache process writing a cache: a CLI subprocess or a forked child.

    ``env`` is added to the process environment (e.g. RANK/WORLD_SIZE as torchrun sets them).
    The settings go through a config file of their own (defaults <- that file), so a
    concurrent edit of the repository's pipeline.toml cannot change a campaign midway.
    """

    def __init__(self, mode: str, settings: dict, workdir: Path, env: dict[str, str] | None = None,
                 more_crops: int = 0):
        env = env or {}
        cfg = workdir / f"config-{time.monotonic_ns()}.toml"
        cfg.write_text(config_toml(settings))
        if mode == "cli":
            cmd = [sys.executable, "-c", "from stage2_student_distill.app.cli import main; main()", "--config", str(cfg), "teacher-cache"]
            cmd += ["--more-crops", str(more_crops)] if more_crops else []
            self._proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO), **env),
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        else:
            self._proc = multiprocessing.get_context("fork").Process(target=_forked_run, args=(cfg, env, more_crops))
            self._proc.start()

    def running(self) -> bool:
        return (self._proc.poll() if isinstance(self._proc, subprocess.Popen) else self._proc.exitcode) is None

    def kill(self) -> None:
        os.kill(self._proc.pid, signal.SIGKILL)

    def wait(self, timeout: float = 300) -> int:
        if isinstance(self._proc, subprocess.Popen):
            _, err = self._proc.communicate(timeout=timeout)
            if self._proc.returncode:
                print(err.decode()[-2000:], file=sys.stderr)
            return self._proc.returncode
        self._proc.join(timeout)
        return self._proc.exitcode


def wait_until(done, writer: Writer, timeout: float = 300) -> float:
    """Poll ``done()`` while the writer runs; return the time it became true (or the writer ended)."""
    deadline = time.monotonic() + timeout
    while not done() and writer.running():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout} s")
        time.sleep(0.005)
    return time.monotonic()


def records_written(out: Path) -> int:
    """Shard records on disk: each is one chunk file, renamed into place when the shard is complete."""
    folder = out / "shard_record" / "c"
    return sum(1 for f in folder.iterdir() if not f.name.endswith(".partial")) if folder.is_dir() else 0


def grow_progress(out: Path, from_crops: int, shards: int) -> int:
    """Shards of a grow done: the staging cache's records, all of them once the swap has begun."""
    attrs = json.loads((out / "zarr.json").read_text())["attributes"]
    marker = attrs.get("growing")
    if marker is None:
        return 0 if attrs["crops"]["num_crops"] == from_crops else shards
    if marker["phase"] == "swapping":
        return shards
    return records_written(out / "grow")


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    reader = CacheReader(path)
    return {name: np.asarray(reader.arrays[name][:]) for name in ARRAYS}


@dataclass
class Result:
    kills: int = 0
    finished_before_kill: int = 0
    complete_at_kill: list[int] = field(default_factory=list)  # shards complete when each kill landed
    partial_files_at_kill: int = 0  # kills that left a zarr temp file (a write in flight)
    failures: list[str] = field(default_factory=list)
    work_seconds: float = 0.0
    shards: int = 0

    def summary(self) -> str:
        spread = np.bincount(self.complete_at_kill, minlength=self.shards + 1).tolist() if self.kills else []
        mid_run = sum(0 < c < self.shards for c in self.complete_at_kill)
        return (f"{self.kills} kill(s), {mid_run} with some but not all shards complete "
                f"(+{self.finished_before_kill} run(s) that finished first); "
                f"shards complete at the kill (count per 0..{self.shards}): {spread}; "
                f"{self.partial_files_at_kill} kill(s) caught a chunk write in flight; "
                f"writing phase of the uninterrupted run {self.work_seconds:.2f} s "
                f"({self.work_seconds / max(1, self.shards):.2f} s per shard); "
                + ("every resumed cache equal to the uninterrupted one and verified"
                   if not self.failures else f"{len(self.failures)} FAILURE(S): {self.failures}"))


def run_trials(workdir: Path, mode: str, kills: int, kills_per_trial: int, images: int = 24,
               images_per_shard: int = 2, seed: int = 0, max_trials: int | None = None, grow: bool = False) -> Result:
    """Trials until ``kills`` kills have landed (at most ``max_trials``, default 3 x kills)."""
    max_trials = max_trials or 3 * kills
    sizes = [SIZES[i % len(SIZES)] for i in range(images)]
    manifest = make_manifest(workdir, "faults", sizes=sizes)
    settings = lambda out, **more: overrides(manifest, out, **{"teacher_cache.images_per_shard": images_per_shard},  # noqa: E731
                                             **more)

    shards = -(-images // images_per_shard)
    reference = workdir / "reference"  # C = 3 from scratch
    if grow:
        assert Writer(mode, settings(reference), workdir).wait() == 0, "the from-scratch run failed"
        base = workdir / "base"  # each trial grows a copy of this complete 2-crop cache by one crop
        assert Writer(mode, settings(base, **{"crops.num_crops": 2}), workdir).wait() == 0
        start = lambda out: shutil.copytree(base, out)  # noqa: E731
        launch = lambda out: Writer(mode, settings(out, **{"crops.num_crops": 2}), workdir, more_crops=1)  # noqa: E731
        progress = lambda out: grow_progress(out, 2, shards)  # noqa: E731
        begun = lambda out: (out / "grow" / "shard_record" / "zarr.json").exists()  # noqa: E731
        timed = workdir / "timed"  # an uninterrupted grow, timed from its first write to its last record
    else:
        start = lambda out: None  # noqa: E731
        launch = lambda out: Writer(mode, settings(out), workdir)  # noqa: E731
        progress = records_written
        begun = lambda out: (out / "zarr.json").exists()  # noqa: E731
        timed = reference  # timed from its first write to its last record
    start(timed)
    writer = launch(timed)
    began = wait_until(lambda: begun(timed), writer)
    ended = wait_until(lambda: progress(timed) == shards, writer)
    assert writer.wait() == 0, "the uninterrupted run failed"
    expected = read_arrays(reference)
    assert all(np.array_equal(a, b) for a, b in zip(read_arrays(timed).values(), expected.values()))
    result = Result(work_seconds=ended - began, shards=shards)
    rng = np.random.default_rng(seed)

    for trial in range(max_trials):
        if result.kills >= kills:
            break
        out = workdir / f"trial-{trial}"
        start(out)
        for _ in range(kills_per_trial):
            writer = launch(out)
            wait_until(lambda: begun(out), writer)
            j = int(rng.integers(0, shards))
            wait_until(lambda: progress(out) >= j, writer)
            time.sleep(rng.uniform(0, result.work_seconds / shards))
            if not writer.running():
                result.finished_before_kill += 1
                writer.wait()
                continue
            writer.kill()
            writer.wait()
            result.kills += 1
            created = (out / "zarr.json").exists()  # a kill during creation leaves no cache at all
            result.complete_at_kill.append(min(shards, progress(out)) if grow else
                                           int(CacheReader(out, require_complete=False).complete.sum()) if created else 0)
            result.partial_files_at_kill += any(out.rglob("*.partial"))
        writer = launch(out)
        if writer.wait() != 0:
            result.failures.append(f"trial {trial}: the resuming run failed")
            continue
        got = read_arrays(out)
        unequal = [name for name in ARRAYS if not np.array_equal(got[name], expected[name])]
        problems = verify_cache(out)
        if unequal or problems:
            result.failures.append(f"trial {trial}: arrays differ {unequal}, verify {problems}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="kills that must land (runs that finish first do not count)")
    parser.add_argument("--kills-per-trial", type=int, default=1)
    parser.add_argument("--mode", choices=["cli", "fork"], default="cli")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--images-per-shard", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grow", action="store_true", help="kill `teacher-cache --more-crops 1` growing 2 -> 3 crops")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fault-kill-") as tmp:
        started = time.monotonic()
        result = run_trials(Path(tmp), args.mode, args.kills, args.kills_per_trial,
                            images=args.images, images_per_shard=args.images_per_shard, seed=args.seed, grow=args.grow)
    print(f"mode {args.mode}{' --grow' if args.grow else ''}, {args.images} images in {result.shards} shards, {time.monotonic() - started:.0f} s:")
    print(result.summary())
    sys.exit(1 if result.failures else 0)


if __name__ == "__main__":
    main()
