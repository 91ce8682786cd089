"""Where the training loop's per-epoch records go: RUN/metrics.jsonl always, TensorBoard on request.

``optim.log = "tensorboard"`` (``--log tensorboard``, the ``tensorboard`` extra)
adds TensorBoard event files in the run directory itself, so
``tensorboard --logdir runs/`` shows each run under its directory name. Both
sinks get the same record (``append``), one point per completed epoch with the
epoch as the step; metrics.jsonl stays the record that resume and the tools read.

Tags: ``train/<part>`` (loss, kl, d_loss), ``val/top1``, ``val/top5``,
``val/loss``, ``lr/student``, ``lr/discriminator``, ``speed/img_per_s`` and
``time/epoch_s``.

On resume the event writer starts with ``purge_step`` = the first epoch to
train again, so TensorBoard drops points a crash left after the last checkpoint,
as MetricsLog cuts metrics.jsonl back.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from common.config import ConfigError
from stage2_student_distill.checkpoint import writing
from stage2_student_distill.metrics import MetricsLog

# metrics.jsonl key -> TensorBoard tag, for the keys that are not train_<part> / val_<metric>
_TAGS = {"lr": "lr/student", "disc_lr": "lr/discriminator", "img_per_s": "speed/img_per_s", "time_s": "time/epoch_s"}


def tensorboard_tag(key: str) -> str | None:
    """The tag a metrics.jsonl key is written under; None for ``epoch`` (the step)."""
    for prefix in ("train_", "val_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix):]}"
    return _TAGS.get(key)


def _summary_writer():
    """torch's SummaryWriter class; a missing tensorboard package is a one-line error."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError(
            f"optim.log = 'tensorboard' needs the tensorboard package ({e}): "
            "pip install 'mealv2-pipeline[tensorboard]', or log with --log jsonl"
        ) from e
    return SummaryWriter


class TensorBoardLog:
    def __init__(self, run_dir: Path, completed_epochs: int):
        self.path = run_dir  # its event files are written in the run directory itself
        self.writer = _summary_writer()(log_dir=str(run_dir), purge_step=completed_epochs + 1)

    def append(self, record: dict[str, Any]) -> None:
        step = int(record["epoch"])
        for key, value in record.items():
            tag = tensorboard_tag(key)
            if tag is not None:
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # one flush an epoch: a crash loses no finished epoch, and no close() is needed


class RunLog:
    """The loop's one metrics interface: ``append(record)`` once per completed epoch."""

    def __init__(self, sinks: list[Any]):
        self.sinks = sinks

    def append(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            with writing(sink.path, record["epoch"]):  # a full disk: one line naming the file
                sink.append(record)


def open_run_log(run_dir: str | Path, completed_epochs: int, log: str, write: bool = True) -> RunLog | None:
    """The sinks ``optim.log`` (jsonl | tensorboard, validated by the config) asks for, after keeping
    ``completed_epochs`` epochs of earlier lines.

    Every rank calls it so that a missing tensorboard package stops all ranks alike;
    only the one with ``write`` (rank 0) gets a log, the others None.
    """
    if log == "tensorboard":
        _summary_writer()  # before any rank trains
    if not write:
        return None
    run_dir = Path(run_dir)
    with writing(run_dir / "metrics.jsonl"):  # cut back to the completed epochs: rewrites the file
        sinks: list[Any] = [MetricsLog(run_dir / "metrics.jsonl", completed_epochs=completed_epochs)]
    if log == "tensorboard":
        sinks.append(TensorBoardLog(run_dir, completed_epochs))
    return RunLog(sinks)
