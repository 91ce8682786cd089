"""stage2_student_distill.metrics: the one reader and writer of RUN/metrics.jsonl."""
from __future__ import annotations

from stage2_student_distill.metrics import MetricsLog, read_metrics


def test_read_metrics_of_a_run_not_started_is_empty(tmp_path):
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_read_metrics_returns_every_record_in_order_skipping_blank_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "val_top1": 10.5}\n\n{"epoch": 2, "train_loss": 0.25}\n')
    assert read_metrics(path) == [{"epoch": 1, "val_top1": 10.5}, {"epoch": 2, "train_loss": 0.25}]


def test_resume_cuts_the_log_back_to_the_checkpointed_epochs(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(f'{{"epoch": {e}}}\n' for e in (1, 2, 3)))  # epoch 3 logged, its checkpoint lost
    log = MetricsLog(path, completed_epochs=2)
    log.append({"epoch": 3, "lr": 0.1})
    assert read_metrics(path) == [{"epoch": 1}, {"epoch": 2}, {"epoch": 3, "lr": 0.1}]
