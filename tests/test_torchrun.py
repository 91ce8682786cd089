"""Both stages under torchrun: 2 gloo ranks on the CPU, launched as a user would.

Each launch is ``python -m torch.distributed.run --standalone --nproc_per_node 2``
(``--standalone`` rendezvous on a free local port) of ``pipeline`` through
tests/torchrun_probe.py, which records per rank the sample ids it trained on,
its final student state and the files it wrote. Each rank's stdout/stderr go
to its own log file (``--redirects 3``), so every rank's messages are checked.
One torch thread per rank (``OMP_NUM_THREADS=1``); each launch takes tens of
seconds on 2 busy cores, and a hang fails at ``TIMEOUT``, far below the default
collective timeout (30 min for gloo).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.cache_format import CacheReader
from common.manifest import load_manifest
from stage1_fixtures import dataset  # noqa: F401
from test_distill import data, without_timing  # noqa: F401  (data: 12 + 6 images, a C = 3 cache)
from torchrun_probe import state_digest

REPO = Path(__file__).resolve().parent.parent
PROBE = REPO / "tests" / "torchrun_probe.py"
TIMEOUT = 300
RANKS = 2
CROPS = 3  # the crops per image of test_distill's cache


@dataclass
class Launch:
    returncode: int
    seconds: float
    output: str  # torchrun's own output (its failure report)
    stdout: list[str]  # per rank
    stderr: list[str]
    probe: list[dict]  # per rank: tests/torchrun_probe.py's record


def torchrun(tmp: Path, name: str, *args: str) -> Launch:
    probe, logs = tmp / f"{name}-probe", tmp / f"{name}-logs"
    probe.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PROBE_DIR=str(probe), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS),
           "--log-dir", str(logs), "--redirects", "3", str(PROBE),
           "--set", "runtime.device=cpu", "--set", "runtime.progress=false", "--set", "runtime.num_workers=1",
           "--set", "runtime.seed=0", *args]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    seconds = time.monotonic() - started
    (attempt,) = logs.glob("*/attempt_0")  # one run id, no restarts

    def read(rank: int, stream: str) -> str:
        path = attempt / str(rank) / f"{stream}.log"
        return path.read_text() if path.exists() else ""

    records = [json.loads(p.read_text()) if (p := probe / f"rank{r}.json").exists() else None for r in range(RANKS)]
    return Launch(proc.returncode, seconds, proc.stdout + proc.stderr,
                  [read(r, "stdout") for r in range(RANKS)], [read(r, "stderr") for r in range(RANKS)], records)


def check_ok(launch: Launch) -> None:
    assert launch.returncode == 0, launch.output[-3000:] + "".join(launch.stderr)
    assert all(launch.probe), "a rank did not write its probe record"


def test_teacher_check_failure_stops_every_rank_with_the_message(dataset, tmp_path):  # noqa: F811
    """Random-init teachers are at chance; the check must stop both ranks promptly, each with the message
    (before: rank 0 failed alone and rank 1 died in its barrier with a bare gloo traceback)."""
    # two teachers, so the summed hits include the leave-one-out rows (docs/teachers.md)
    launch = torchrun(tmp_path, "check", "teacher-cache", "--teachers", "test_resnet,test_efficientnet",
                      "--no-pretrained", "--input-size", "test_resnet=32", "--input-size", "test_efficientnet=32",
                      "--manifest", str(dataset["train"]),
                      "--out", str(tmp_path / "cache"), "--num-crops", "2", "--loader", "torch",
                      "--evaluate-teachers", str(dataset["val"]))
    assert launch.returncode != 0
    assert launch.seconds < TIMEOUT / 2
    for rank, err in enumerate(launch.stderr):
        assert "Error: teacher check failed: test_resnet (top-1" in err, f"rank {rank}:\n{err}"
        assert "Traceback" not in err, f"rank {rank}:\n{err}"
    # Each rank scored a share, the table (all 6 images) is printed once, and nothing was written.
    assert "on 6 images" in launch.stdout[0] and "on 6 images" not in launch.stdout[1]
    assert "ensemble without it" in launch.stdout[0]
    assert not (tmp_path / "cache").exists()


def test_a_bad_image_on_one_rank_stops_both_ranks_with_messages(dataset, tmp_path):  # noqa: F811
    """Rank 1's shard holds an unreadable image: rank 1 exits with the image's error at once; rank 0,
    done with its shards and waiting for rank 1's, says another rank stopped (before: a gloo traceback)."""
    manifest = load_manifest(dataset["train"])
    root = tmp_path / "images"
    shutil.copytree(manifest.root, root)
    (root / manifest.paths[5]).write_bytes(b"not an image")  # image 5: shard 1 (images 4-7), rank 1's
    launch = torchrun(tmp_path, "bad", "--set", f"data.data_root={root}", "teacher-cache", "--teachers",
                      "test_resnet", "--no-pretrained", "--input-size", "test_resnet=32",
                      "--manifest", str(dataset["train"]), "--out", str(tmp_path / "cache"), "--num-crops", "2",
                      "--images-per-shard", "4", "--loader", "torch")
    assert launch.returncode != 0 and launch.seconds < TIMEOUT / 2
    assert f"Error: {root / manifest.paths[5]}: not an image file" in launch.stderr[1]
    # rank 0 may be stopped by torchrun before it reaches the exchange; if it got there, it said why
    assert "Traceback" not in launch.stderr[0] + launch.stderr[1], launch.stderr
    if "Error:" in launch.stderr[0]:
        assert "Error: another rank stopped while this one was waiting for every rank's last shard" in launch.stderr[0]


def distill(data, tmp: Path, name: str, out: Path, epochs: int, *extra: str) -> Launch:  # noqa: F811
    return torchrun(tmp, name, "distill", "--student", "test_resnet", "--cache", str(data["cache"]),
                    "--manifest", str(data["train"]), "--val-manifest", str(data["val"]), "--out", str(out),
                    "--epochs", str(epochs), "--batch-size", "3", "--eval-batch-size", "4", "--img-size", "32",
                    "--lr", "0.05", "--schedule", "step", "--lr-decay-epochs", "1", "--loader", "torch",
                    "--log-every", "1", "--cutmix-prob", "0.5", *extra)


def test_distill_ddp_shares_weights_checkpoints_and_resume(data, tmp_path):  # noqa: F811
    whole = tmp_path / "whole"
    run = distill(data, tmp_path, "whole", whole, 2)
    check_ok(run)
    num_images = CacheReader(data["cache"]).num_images

    # Disjoint shares: every epoch, the ranks' images partition the training set (6 each, none twice).
    for epoch in ("0", "1"):
        ids = [torch.tensor(r["samples"][epoch]) for r in run.probe]
        images = [set((i // CROPS).tolist()) for i in ids]
        assert [len(i) for i in ids] == [len(s) for s in images] == [num_images // RANKS] * RANKS
        assert images[0].isdisjoint(images[1]) and images[0] | images[1] == set(range(num_images))
    assert run.probe[0]["samples"]["0"] != run.probe[0]["samples"]["1"]  # a new share and crops each epoch

    # Identical students on both ranks (parameters and BatchNorm statistics), equal to the checkpoint.
    last = torch.load(whole / "last.pt", weights_only=True)
    assert run.probe[0]["state_sha256"] == run.probe[1]["state_sha256"] == state_digest(last["model"])
    assert last["epoch"] == 2

    # Checkpoints and metrics written by rank 0 only, once per epoch; rank 1 writes nothing in the run.
    written = [[Path(p).resolve() for p in r["writes"] if Path(p).resolve().is_relative_to(whole.resolve())]
               for r in run.probe]
    assert written[1] == []
    assert written[0].count(whole.resolve() / "last.pt") == 2
    assert written[0].count(whole.resolve() / "config.json") == 1
    assert len((whole / "metrics.jsonl").read_text().splitlines()) == 2
    assert run.stdout[0].count("epoch 2/2") == 1 and "epoch 2/2" not in run.stdout[1]

    # --resume under torchrun: 1 epoch, then resume to 2 (past the lr milestone) = the uninterrupted run.
    split = tmp_path / "split"
    check_ok(distill(data, tmp_path, "split1", split, 1))
    resumed = distill(data, tmp_path, "split2", split, 2, "--resume")
    check_ok(resumed)
    assert "resuming" in resumed.stdout[0] and "after epoch 1" in resumed.stdout[0]
    assert [set(r["samples"]) for r in resumed.probe] == [{"1"}, {"1"}]  # only the missing epoch was trained
    assert [r["samples"]["1"] for r in resumed.probe] == [r["samples"]["1"] for r in run.probe]
    assert [r["state_sha256"] for r in resumed.probe] == [r["state_sha256"] for r in run.probe]
    got = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert without_timing(got) == without_timing(expected)
