"""Tiny datasets and configs for the teacher-cache tests (imported by test modules, not a conftest)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.config import load_config
from data_manifests.build import build_manifest

CLASSES = ("ant", "bee", "cat")
# Varied sizes and aspect ratios, including tall, wide and tiny images.
SIZES = [(40, 30), (57, 64), (33, 80), (90, 45), (48, 48), (25, 70), (64, 20), (37, 52), (70, 66)]
TEACHERS = ("test_resnet", "test_efficientnet")
# Different sizes per teacher, so the test sees each teacher render its own view.
INPUT_SIZES = ("test_resnet=32", "test_efficientnet=40")


def write_tree(root: Path, sizes, seed: int) -> Path:
    """ImageFolder tree of random RGB PNGs, images dealt round-robin over CLASSES."""
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        folder = root / CLASSES[i % len(CLASSES)]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.png")
    return root


def make_manifest(tmp: Path, name: str, sizes=SIZES, seed: int = 0) -> Path:
    root = write_tree(tmp / f"{name}-images", sizes, seed)
    out = tmp / f"{name}.parquet"
    build_manifest(root, out, progress=False)
    return out


def overrides(manifest: Path, out: Path, **extra) -> dict:
    """Flat config overrides of a fast CPU run: 2 tiny random-init teachers, C=3, k=2, shards of 4."""
    base = {
        "runtime.device": "cpu",
        "runtime.progress": False,
        "runtime.num_workers": 2,
        "data.manifest": str(manifest),
        "crops.num_crops": 3,
        "teacher_cache.teachers": list(TEACHERS),
        "teacher_cache.input_sizes": list(INPUT_SIZES),
        "teacher_cache.pretrained": False,
        "teacher_cache.out": str(out),
        "teacher_cache.topk": 2,
        "teacher_cache.batch_size": 7,  # groups of 2 images; batches straddle images and groups
        "teacher_cache.images_per_shard": 4,
        "teacher_cache.loader": "torch",
    }
    base.update(extra)
    return base


def config(manifest: Path, out: Path, **extra):
    return load_config(None, overrides(manifest, out, **extra))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("stage1")
    return {
        "tmp": tmp,
        "train": make_manifest(tmp, "train"),
        # same classes, other images: a labelled validation set and a "different manifest"
        "val": make_manifest(tmp, "val", sizes=SIZES[:6], seed=1),
    }


REPO = Path(__file__).resolve().parents[1]


# A stage 1 run (argv: settings JSON, flag path, the writer's path end, more_crops) whose writer at a path
# ending so writes half of shard 1 with no completion record, creates the flag and hangs: what a kill
# mid-write leaves once the parent SIGKILLs it.
_KILLABLE_RUN = """
import json, sys, time
from common.cache_format import CacheWriter
from common.config import load_config
from stage1_teacher_cache.run import run

settings, flag, writer_path_end, more_crops = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
write_shard = CacheWriter.write_shard

def write_then_hang(self, shard, *arrays):
    if self.path.endswith(writer_path_end) and shard == 1:
        start, stop = self.shard_range(shard)
        self.arrays["topk_prob"][start:stop] = 0.5
        open(flag, "w").close()
        time.sleep(600)
    write_shard(self, shard, *arrays)

CacheWriter.write_shard = write_then_hang
run(load_config(None, settings), more_crops=more_crops)
"""


def kill_inside_shard_1(settings: dict, flag: Path, tmp: Path, waiting_for: str, *, writer_path_end: str = "",
                        more_crops: int = 0, timeout_s: float = 90) -> None:
    """Run stage 1 (``more_crops``: a grow) with ``settings`` in a child process and SIGKILL it half-way through
    writing shard 1 of the cache whose path ends in ``writer_path_end`` ("": any), like a crash there."""
    path = tmp / "killable.py"
    path.write_text(_KILLABLE_RUN)
    proc = subprocess.Popen([sys.executable, str(path), json.dumps(settings), str(flag), writer_path_end,
                             str(more_crops)], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while not flag.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, f"the run never reached {waiting_for}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
