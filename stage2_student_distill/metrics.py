"""RUN/metrics.jsonl: one JSON object per completed epoch, append-only.

Fields: ``epoch`` (1-based, completed), ``train_<part>`` (mean over the
epoch's samples of each loss part: ``loss`` = the total; distill adds ``kl``
and, with the discriminator, ``d_loss``), ``val_top1`` / ``val_top5`` (percent)
and ``val_loss`` (cross entropy; the ``val_*`` keys only on validated epochs,
see ``optim.eval_every``), ``lr`` (and ``disc_lr``) at the epoch's
first step, ``img_per_s`` (training samples per second, all ranks) and
``time_s`` (wall time of the epoch including validation).

Each line is flushed and fsynced when written, so a crash loses at most the
epoch in flight. On resume the file is cut back to the epochs that last.pt
covers: an epoch whose line was written but whose checkpoint was not is
trained again and must not appear twice.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_bytes


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of ``RUN/metrics.jsonl``, oldest first; ``[]`` when the run has not written one yet.

    The one reader of the file: training (to cut it back on resume), the demo and the benchmarks.
    """
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLog:
    def __init__(self, path: str | Path, completed_epochs: int):
        """Open for appending after keeping the lines of the first ``completed_epochs`` epochs."""
        self.path = Path(path)
        kept = [r for r in read_metrics(self.path) if r.get("epoch", 0) <= completed_epochs]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def append(self, record: dict[str, Any]) -> None:
        line = memoryview((json.dumps(record) + "\n").encode())
        with open(self.path, "ab", buffering=0) as f:  # unbuffered: nothing left to flush after a failure
            end = f.seek(0, os.SEEK_END)
            try:
                while line:  # a raw write may take part of the line
                    line = line[f.write(line):]
                os.fsync(f.fileno())
            except OSError:
                # A full disk can take part of the line (or all of it, unsynced): cut it off, so the
                # file stays whole JSON lines for the resume that follows (truncating frees, never needs, space).
                with contextlib.suppress(OSError):
                    f.truncate(end)
                raise
