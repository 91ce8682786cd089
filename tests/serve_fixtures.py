"""Inputs for the `pipeline serve` tests: a tiny checkpoint, a tiny cache and two runs (imported, not a conftest)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from common.cache_format import CacheReader
from stage1_teacher_cache.run import run as teacher_cache
from tests.stage1_fixtures import config, make_manifest

pytest.importorskip("flask", reason="pipeline serve needs Flask: pip install '.[serve]'")

from stage2_student_distill.app.serve.app import Served, create_app, make_server  # noqa: E402

NAMES = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]  # 7 classes: the page shows the top 5
PRE = {"input_size": 32, "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
       "crop_pct": 0.875}


def write_checkpoint(path: Path) -> torch.nn.Module:
    """The shape `pipeline train` writes to RUN/best.pt: {"model": state dict, "meta": {...}}."""
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=len(NAMES)).eval()
    meta = {"kind": "train", "model": "test_resnet", "num_classes": len(NAMES), "preprocess": PRE,
            "class_names": NAMES}
    torch.save({"model": model.state_dict(), "meta": meta}, path)
    return model


def write_run(run_dir: Path, lr: float, top1: list[float], loss: list[float], student: str = "test_resnet") -> Path:
    """A run directory as `pipeline distill` leaves it: config.json and one metrics line per epoch."""
    run_dir.mkdir(parents=True)
    cfg = {"optim": {"lr": lr, "epochs": len(top1), "batch_size": 8},
           "distill": {"student": student, "out": str(run_dir)}, "runtime": {"device": "cpu"}}
    (run_dir / "config.json").write_text(json.dumps(cfg))
    lines = [{"epoch": e + 1, "train_loss": 2.0 - e * 0.1, "val_top1": t, "val_top5": 100.0, "val_loss": v}
             for e, (t, v) in enumerate(zip(top1, loss))]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run_dir


def png_bytes(w: int, h: int, seed: int = 0) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("serve")
    manifest = make_manifest(tmp, "train")
    other = make_manifest(tmp, "other", seed=5)  # same classes, other images: a manifest the cache was not built for
    cache = tmp / "cache"
    teacher_cache(config(manifest, cache))
    ckpt = tmp / "best.pt"
    model = write_checkpoint(ckpt)
    runs = tmp / "runs"
    write_run(runs / "lr_0.1", 0.1, [20.0, 35.0, 50.0], [1.9, 1.6, 1.2])
    write_run(runs / "lr_0.01", 0.01, [15.0, 25.0, 30.0], [2.0, 1.8, 1.7])
    (tmp / "secret.txt").write_text("not for the web")
    return {"tmp": tmp, "manifest": manifest, "other": other, "cache": cache, "ckpt": ckpt, "model": model,
            "runs": runs, "reader": CacheReader(str(cache))}


def served(inputs: dict, **kw) -> Served:
    args = {"checkpoint": inputs["ckpt"], "cache": inputs["cache"], "manifest": inputs["manifest"],
            "runs": [inputs["runs"]]}
    args.update(kw)
    s = Served(**args)
    if s.cache is not None:
        assert s.cache.wait(60), "cache verification did not finish"
    return s


class LiveServer:
    """The real server on a free 127.0.0.1 port, in a thread."""

    def __init__(self, app):
        import threading

        self.server = make_server(app, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


__all__ = ["NAMES", "PRE", "LiveServer", "create_app", "inputs", "png_bytes", "served", "write_run"]
