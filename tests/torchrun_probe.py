"""Test-only entry point for the torchrun tests: ``pipeline ...`` plus a record of what this rank did.

Run as ``python -m torch.distributed.run ... tests/torchrun_probe.py ARGS`` with
``PROBE_DIR`` set; at exit every rank writes ``PROBE_DIR/rank{R}.json``:

* ``samples``: ``{epoch: [sample ids of the training batches, in order]}`` as
  the training loop received them (``Loader.epoch``, eval loaders excluded);
* ``state_sha256``: digest of the student's state dict after ``fit`` (every
  parameter and buffer, bitwise), so the ranks' final models can be compared;
* ``writes``: every file this rank opened for writing or renamed into place
  (the atomic checkpoint writes end in ``os.replace``), from Python's audit hooks.

Nothing here changes what the command computes; it only watches.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from stage2_student_distill import loaders, train
from stage2_student_distill.checkpoint import unwrap

RANK = int(os.environ.get("RANK", "0"))
record: dict = {"rank": RANK, "samples": {}, "state_sha256": None, "writes": []}


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every tensor, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _audit(event: str, args: tuple) -> None:
    if event == "os.rename":
        record["writes"].append(str(args[1]))
    elif event == "open" and isinstance(args[0], (str, Path)):
        mode, flags = args[1], args[2] if len(args) > 2 else 0
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR))
        if writing:
            record["writes"].append(str(args[0]))


_epoch = loaders.Loader.epoch


def _recorded_epoch(self, epoch: int):
    for batch in _epoch(self, epoch):
        if self.mode != "eval":
            record["samples"].setdefault(str(epoch), []).extend(batch.sample_ids.tolist())
        yield batch


_fit = train.fit


def _recorded_fit(job):
    result = _fit(job)
    record["state_sha256"] = state_digest(unwrap(job.student).state_dict())
    return result


def _write_record() -> None:
    out = Path(os.environ["PROBE_DIR"]) / f"rank{RANK}.json"
    out.write_text(json.dumps(record))


if __name__ == "__main__":
    loaders.Loader.epoch = _recorded_epoch
    train.fit = _recorded_fit
    atexit.register(_write_record)
    sys.addaudithook(_audit)
    from stage2_student_distill.app.cli import main

    main(prog_name="pipeline")
