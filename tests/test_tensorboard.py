"""`--log tensorboard`: the event files hold what metrics.jsonl holds, read back with TensorBoard's own reader."""
from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from stage2_student_distill.app.cli import main
from stage2_student_distill.metrics import read_metrics
from stage2_student_distill.train import run_distill
from test_distill import data, distill_config  # noqa: F401  (data: the manifests + cache fixture)

pytest.importorskip("tensorboard", reason="TensorBoard tests need the tensorboard package (extra `tensorboard`)")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

# metrics.jsonl key -> tag, written out by hand from the documented tag list (not from the code's mapping)
EXPECTED_TAGS = {
    "train_loss": "train/loss", "train_kl": "train/kl", "train_d_loss": "train/d_loss",
    "val_top1": "val/top1", "val_top5": "val/top5", "val_loss": "val/loss",
    "lr": "lr/student", "disc_lr": "lr/discriminator", "img_per_s": "speed/img_per_s", "time_s": "time/epoch_s",
}


def events(run_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_same_as_jsonl(run_dir, keys) -> None:
    records = read_metrics(run_dir / "metrics.jsonl")
    got = events(run_dir)
    assert set(got) == {EXPECTED_TAGS[k] for k in keys}
    for key in keys:
        expected = [(r["epoch"], pytest.approx(r[key], rel=1e-6)) for r in records if key in r]  # float32 in events
        assert got[EXPECTED_TAGS[key]] == expected, key


def test_distill_writes_every_metric_as_tensorboard_scalars(data, tmp_path):
    out = tmp_path / "run"
    run_distill(distill_config(data, out, **{"optim.log": "tensorboard", "optim.epochs": 2}))
    assert list(out.glob("events.out.tfevents.*"))  # next to metrics.jsonl, so --logdir runs/ names the run
    assert_same_as_jsonl(out, list(EXPECTED_TAGS))
    assert [step for step, _ in events(out)["val/top1"]] == [1, 2]


def test_resume_drops_points_of_an_epoch_that_was_not_checkpointed(data, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path / "run"
    run_distill(distill_config(data, out, **{"optim.log": "tensorboard", "optim.epochs": 1}))
    stray = SummaryWriter(str(out))  # what a crash after logging epoch 2, before last.pt, leaves behind
    stray.add_scalar("train/loss", 999.0, 2)
    stray.close()
    run_distill(distill_config(data, out, **{"optim.log": "tensorboard", "optim.epochs": 2, "distill.resume": True}))
    losses = events(out)["train/loss"]
    assert [step for step, _ in losses] == [1, 2] and 999.0 not in [v for _, v in losses]
    assert_same_as_jsonl(out, list(EXPECTED_TAGS))


def test_train_cli_logs_to_tensorboard(data, tmp_path):
    out = tmp_path / "train"
    result = CliRunner().invoke(main, [
        "--set", "runtime.progress=false", "train", "--model", "test_resnet", "--device", "cpu", "--loader", "torch",
        "--manifest", str(data["train"]), "--val-manifest", str(data["val"]), "--out", str(out),
        "--epochs", "1", "--batch-size", "4", "--img-size", "32", "--num-workers", "1", "--log", "tensorboard",
    ])
    assert result.exit_code == 0, result.output
    assert_same_as_jsonl(out, ["train_loss", "val_top1", "val_top5", "val_loss", "lr", "img_per_s", "time_s"])


def test_missing_tensorboard_is_one_line_naming_the_extra(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails as if not installed
    result = CliRunner().invoke(main, [
        "--set", "runtime.progress=false", "distill", "--student", "test_resnet", "--device", "cpu",
        "--manifest", str(data["train"]), "--val-manifest", str(data["val"]), "--cache", str(data["cache"]),
        "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4", "--img-size", "32", "--loader", "torch",
        "--num-workers", "1", "--log", "tensorboard",
    ])
    assert result.exit_code == 1 and result.exception.__class__ is SystemExit
    message = result.output.strip()
    assert "\n" not in message and "mealv2-pipeline[tensorboard]" in message, message
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the first epoch


def test_only_the_writing_rank_gets_a_log_but_every_rank_checks_the_package(tmp_path, monkeypatch):
    from stage2_student_distill.metrics_log import open_run_log

    assert open_run_log(tmp_path, 0, "tensorboard", write=False) is None
    assert list(tmp_path.iterdir()) == []  # a rank other than 0 writes nothing
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ValueError, match=r"mealv2-pipeline\[tensorboard\]"):
        open_run_log(tmp_path, 0, "tensorboard", write=False)
    assert open_run_log(tmp_path, 0, "jsonl") is not None  # jsonl alone needs no tensorboard
