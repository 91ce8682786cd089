"""Guards of a stage-2 training run (issue #26): a loss that turns non-finite, two runs into one
run directory, an invalid device, a disk that fills up. Each through the CLI: exit 1, one line.

The tiny manifests and teacher cache are test_distill's (12 images of 3 classes, batches of 4:
3 steps an epoch, a random-init ``test_resnet`` student on the CPU).
"""
from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

import stage2_student_distill.losses as losses
from stage2_student_distill.app.cli import main
from common.config import load_config
from stage2_student_distill.metrics import read_metrics
from stage2_student_distill.targets import HardLabelTargets
from stage2_student_distill.train import NonFiniteWatch
from test_distill import data  # noqa: F401  (the tiny manifests + cache fixture)

STEPS_PER_EPOCH = 3  # 12 images, --batch-size 4
ROOT = Path(__file__).resolve().parents[1]


def distill_args(data, out: Path, *extra: str) -> list[str]:
    return ["distill", "--student", "test_resnet", "--cache", str(data["cache"]),
            "--manifest", str(data["train"]), "--val-manifest", str(data["val"]), "--out", str(out),
            "--epochs", "2", "--batch-size", "4", "--eval-batch-size", "8", "--lr", "0.05", "--img-size", "32",
            "--loader", "torch", "--device", "cpu", "--seed", "0", "--num-workers", "1", "--no-progress", *extra]


def train_args(data, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", "test_resnet",
            "--manifest", str(data["train"]), "--val-manifest", str(data["val"]), "--out", str(out),
            "--epochs", "2", "--batch-size", "4", "--eval-batch-size", "8", "--lr", "0.05", "--img-size", "32",
            "--loader", "torch", "--device", "cpu", "--seed", "0", "--num-workers", "1", "--no-progress", *extra]


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def one_line_failure(result) -> str:
    """The message of a command that failed as a user error: exit 1, one line on stderr (besides the
    run's own warnings, e.g. random-weight teachers), no traceback."""
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def epochs_on_disk(out: Path) -> tuple[list[int], int | None, int | None]:
    """(metrics.jsonl's epochs, last.pt's epoch, best.pt's epoch); None for a file that is not there."""
    last = torch.load(out / "last.pt", weights_only=True)["epoch"] if (out / "last.pt").exists() else None
    best = torch.load(out / "best.pt", weights_only=True)["meta"]["epoch"] if (out / "best.pt").exists() else None
    return [r["epoch"] for r in read_metrics(out / "metrics.jsonl")], last, best


def nan_at_call(monkeypatch, module, name: str, call: int, poison=lambda value: value * float("nan")):
    """Make ``module.name`` return ``poison(result)`` on its ``call``-th call (1-based) only."""
    real, calls = getattr(module, name), {"n": 0}

    def patched(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return poison(value) if calls["n"] == call else value

    monkeypatch.setattr(module, name, patched)


def all_finite(state_dict) -> bool:
    return all(torch.isfinite(t).all() for t in state_dict.values() if t.is_floating_point())


# --- 1. a loss that turns non-finite -------------------------------------------------------------

@pytest.mark.parametrize("log_every", ["1", "50"], ids=["seen-on-the-log-step", "seen-at-the-epoch-end"])
def test_a_nan_loss_stops_the_run_naming_epoch_and_step_and_writes_nothing_after_it(data, tmp_path, monkeypatch,
                                                                                    log_every):
    # The KL term turns NaN on its 5th call: epoch 2, step 2 of 3. With --log-every 50 no log step
    # comes in the epoch: the check before the epoch's writes must catch it.
    nan_at_call(monkeypatch, losses, "kl_to_targets", STEPS_PER_EPOCH + 2)
    out = tmp_path / "run"
    message = one_line_failure(cli(*distill_args(data, out, "--log-every", log_every)))

    assert "training stopped at epoch 2 step 2 of 3: the loss is nan" in message
    assert "the batch's inputs and targets are finite, so the training diverged: lower the learning rate (--lr, now 0.05)" in message
    assert f"nothing was written for epoch 2 ({out} keeps epoch 1)" in message
    assert epochs_on_disk(out) == ([1], 1, 1)
    assert all_finite(torch.load(out / "last.pt", weights_only=True)["model"])
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_non_finite_targets_are_named_as_the_cause(data, tmp_path, monkeypatch):
    from stage2_student_distill.targets import CachedTargets

    # epoch 1, step 3: the cache's targets for that batch are NaN (what a hostile cache would serve)
    nan_at_call(monkeypatch, CachedTargets, "__call__", 3)
    out = tmp_path / "run"
    message = one_line_failure(cli(*distill_args(data, out, "--epochs", "1")))
    assert "training stopped at epoch 1 step 3 of 3: the loss is nan; that batch's targets are not finite" in message
    assert f"(the teacher cache {data['cache']} holds non-finite soft labels" in message
    assert message.endswith("nothing was written for epoch 1")
    assert epochs_on_disk(out) == ([], None, None)


def test_online_teachers_that_output_nan_are_named_as_the_cause(data, tmp_path, monkeypatch):
    from stage2_student_distill.targets import OnlineTargets

    nan_at_call(monkeypatch, OnlineTargets, "__call__", 2)  # epoch 1, step 2: the ensemble's mean softmax
    args = [a for a in distill_args(data, tmp_path / "run", "--epochs", "1") if a != "--cache" and a != str(data["cache"])]
    message = one_line_failure(cli(*args, "--online", "--teachers", "test_resnet", "--teacher-input-size",
                                   "test_resnet=32", "--no-teacher-pretrained"))
    assert message == ("Error: training stopped at epoch 1 step 2 of 3: the loss is nan; that batch's targets are not "
                       "finite (the online teachers output non-finite probabilities: check their weights, "
                       "--teacher-weights); nothing was written for epoch 1")


def test_pipeline_train_goes_through_the_same_guard(data, tmp_path, monkeypatch):
    nan_at_call(monkeypatch, losses, "soft_cross_entropy", 1, poison=lambda value: value * float("inf"))
    message = one_line_failure(cli(*train_args(data, tmp_path / "run", "--epochs", "1")))
    assert "training stopped at epoch 1 step 1 of 3: the loss is inf" in message


def test_an_absurd_learning_rate_stops_the_run_instead_of_saving_nan(data, tmp_path):
    out = tmp_path / "run"
    message = one_line_failure(cli(*distill_args(data, out, "--lr", "1e30", "--epochs", "1")))
    # whichever comes first: a non-finite loss, or weights that overflowed on the epoch's last step
    assert "training stopped" in message and "lower the learning rate (--lr, now 1e+30)" in message
    assert epochs_on_disk(out) == ([], None, None)


def test_weights_that_overflow_on_the_last_step_are_not_saved(data, tmp_path, monkeypatch):
    import stage2_student_distill.train as train

    real = train.train_one_epoch

    def overflow_after(job, epoch):  # the last update left an inf weight, with every loss finite
        result = real(job, epoch)
        if epoch == 1:
            with torch.no_grad():
                next(job.student.parameters()).view(-1)[0] = float("inf")
        return result

    monkeypatch.setattr(train, "train_one_epoch", overflow_after)
    out = tmp_path / "run"
    message = one_line_failure(cli(*distill_args(data, out)))
    assert "training stopped after epoch 2: the weights are not finite" in message
    assert f"nothing was written for epoch 2 ({out} keeps epoch 1)" in message
    assert epochs_on_disk(out) == ([1], 1, 1)


def test_the_watch_under_fp16_loss_scaling_tolerates_skipped_steps_but_not_bad_data():
    """What GradScaler skips (a non-finite loss from finite data) is left out of the sums, not a failure;
    non-finite data, or a loss that never comes back, is one."""
    finite, nan = torch.tensor([1.0, 0.5]), torch.tensor([float("nan"), 0.5])
    images, targets = torch.zeros(2, 3), torch.full((2, 3), 1 / 3)
    job = SimpleNamespace(cfg=load_config(None, {"optim.lr": "0.1"}), targets=HardLabelTargets(3), run_dir="RUN")

    watch = NonFiniteWatch(torch.device("cpu"), loss_scaling=True)
    counted = [watch.update(step, parts, images, targets).item() for step, parts in enumerate([finite, nan, finite])]
    assert counted == [1.0, 0.0, 1.0]
    watch.check(job, epoch=0, steps=3)  # no failure

    watch.update(3, nan, images, targets * float("nan"))
    with pytest.raises(ValueError, match=r"epoch 1 step 4 of 9: the loss is nan; that batch's targets are not finite"):
        watch.check(job, epoch=0, steps=9)

    watch = NonFiniteWatch(torch.device("cpu"), loss_scaling=True)
    for step in range(NonFiniteWatch.MAX_SKIPPED_IN_A_ROW):
        watch.update(step, nan, images, targets)
    with pytest.raises(ValueError, match=rf"step {NonFiniteWatch.MAX_SKIPPED_IN_A_ROW} of 40: .*32 steps in a row "
                                         r"overflowed under fp16 loss scaling.*--precision bf16 or fp32"):
        watch.check(job, epoch=0, steps=40)

    # without loss scaling the first non-finite step is the failure
    watch = NonFiniteWatch(torch.device("cpu"), loss_scaling=False)
    watch.update(0, finite, images, targets)
    watch.update(1, nan, images, targets)
    watch.update(2, nan, images * float("inf"), targets)
    with pytest.raises(ValueError, match=r"step 2 of 3: the loss is nan; the batch's inputs and targets are finite"):
        watch.check(job, epoch=0, steps=3)


# --- 2. one run per run directory ----------------------------------------------------------------

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from stage2_student_distill.run_lock import RunDirLock
    lock = RunDirLock(sys.argv[1])
    print("held", flush=True)
    time.sleep(600)
""")


def test_a_second_run_into_a_locked_run_directory_is_refused_naming_the_holder(data, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        message = one_line_failure(cli(*distill_args(data, out, "--epochs", "1")))
        assert f"{out} is in use by another run (pid {holder.pid} on host {socket.gethostname()} since " in message
        assert "wait for it to finish or stop it, or choose another --out" in message
        assert sorted(p.name for p in out.iterdir()) == ["run.lock"]  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()
    # The killed holder's run.lock stays behind; the kernel released its flock, so it blocks nothing.
    assert json.loads((out / "run.lock").read_text())["pid"] == holder.pid
    result = cli(*distill_args(data, out, "--epochs", "1"))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.lock").read_text())["pid"] == os.getpid()


def test_the_lock_is_held_for_the_whole_run_and_released_after_it(data, tmp_path, monkeypatch):
    """While a run trains, taking its directory fails (as a second process would); after the run,
    and after a failed run, the directory is free again (a --resume in the same process works)."""
    import stage2_student_distill.train as train
    from stage2_student_distill.checkpoint import RunError
    from stage2_student_distill.run_lock import RunDirLock

    out, seen = tmp_path / "run", []
    real, real_kl = train.train_one_epoch, losses.kl_to_targets

    def try_to_take(job, epoch):
        with pytest.raises(RunError, match=f"is in use by another run \\(pid {os.getpid()} on host"):
            RunDirLock(out)
        seen.append(epoch)
        return real(job, epoch)

    monkeypatch.setattr(train, "train_one_epoch", try_to_take)
    nan_at_call(monkeypatch, losses, "kl_to_targets", STEPS_PER_EPOCH + 1)  # fails in epoch 2
    one_line_failure(cli(*distill_args(data, out)))
    monkeypatch.setattr(losses, "kl_to_targets", real_kl)
    result = cli(*distill_args(data, out, "--resume"))
    assert result.exit_code == 0, result.output
    assert seen == [0, 1, 1] and epochs_on_disk(out)[:2] == ([1, 2], 2)
    RunDirLock(out).release()


# --- 3. the device ---------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["cuda_evil", "gpu", "cuda:", "cuda:-1", "cpu:0x", "meta"])
def test_an_invalid_device_is_a_config_error_naming_the_key_and_the_forms(tmp_path, device):
    message = one_line_failure(cli("distill", "--device", device, "--out", str(tmp_path / "run")))
    assert message == (f"Error: config key 'runtime.device' = {device!r}: "
                       "use auto, cpu, cuda or cuda:N (N = 0, 1, ...)")
    assert not (tmp_path / "run").exists()


def test_cuda_on_a_machine_without_it_is_one_line(data, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = one_line_failure(cli(*distill_args(data, tmp_path / "run", "--device", "cuda")))
    assert message == "Error: runtime.device = 'cuda' but CUDA is not available here; use device = \"auto\" or \"cpu\""


def test_a_cuda_index_beyond_the_machines_devices_is_one_line(data, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    message = one_line_failure(cli(*distill_args(data, tmp_path / "run", "--device", "cuda:2")))
    assert message == ("Error: runtime.device = 'cuda:2' means cuda:2 here, but this machine shows 2 CUDA device(s) "
                       "(cuda:0..cuda:1, after CUDA_VISIBLE_DEVICES); use one of those, \"cuda\" or \"auto\"")


# --- 4. a write that fails (disk full, read-only, permission) ---------------------------------------

def fail_writes_of(monkeypatch, name: str, nth: int, code: int = errno.ENOSPC) -> None:
    """Make the ``nth`` fsync of the file called ``name`` (or of its atomic temp file ``.name.*.tmp``)
    fail with ``code``, after the bytes were written: where a full disk reports it at the latest."""
    real, count = os.fsync, {"n": 0}

    def fsync(fd):
        target = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        if target == name or target.startswith(f".{name}."):
            count["n"] += 1
            if count["n"] == nth:
                raise OSError(code, os.strerror(code))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


# (file, which of its writes fails, the epoch being saved): best.pt is written first, and only when
# validation improves (epoch 1 here); metrics.jsonl is rewritten when the run opens it, then appended.
@pytest.mark.parametrize("name, nth, epoch", [("best.pt", 1, 1), ("metrics.jsonl", 3, 2), ("last.pt", 2, 2)])
def test_a_full_disk_names_the_file_and_keeps_the_previous_epoch(data, tmp_path, monkeypatch, name, nth, epoch):
    out = tmp_path / "run"
    fail_writes_of(monkeypatch, name, nth)
    message = one_line_failure(cli(*distill_args(data, out)))
    failed = f"Error: {out / name}: writing it for epoch {epoch} failed: No space left on device (disk full); "
    if epoch == 1:
        assert message == failed + ("epoch 1 is not saved (no earlier epoch to keep). "
                                    "Free some space, then rerun the same command.")
        assert epochs_on_disk(out) == ([], None, None)
    else:
        assert message == failed + ("epoch 2 is not saved and the run's files of epoch 1 are kept. "
                                    "Free some space, then rerun with --resume to continue after epoch 1.")
        # last.pt is the commit point: a metrics.jsonl line written before it failed is cut on --resume
        assert epochs_on_disk(out) == ([1, 2] if name == "last.pt" else [1], 1, 1)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]

    monkeypatch.undo()  # space freed: the rerun the message asks for completes the run
    result = cli(*distill_args(data, out, *(["--resume"] if epoch > 1 else [])))
    assert result.exit_code == 0, result.output
    assert epochs_on_disk(out) == ([1, 2], 2, 1)


@pytest.mark.parametrize("code, cause, remedy", [
    (errno.EROFS, "Read-only file system (the filesystem is mounted read-only)",
     "Remount it read-write or choose another --out"),
    (errno.EACCES, "Permission denied (no write permission)", "Give this user write access or choose another --out"),
])
def test_a_read_only_or_forbidden_run_directory_names_the_file(data, tmp_path, monkeypatch, code, cause, remedy):
    out = tmp_path / "run"
    fail_writes_of(monkeypatch, "last.pt", nth=1, code=code)
    message = one_line_failure(cli(*distill_args(data, out, "--epochs", "1")))
    assert message == (f"Error: {out / 'last.pt'}: writing it for epoch 1 failed: {cause}; epoch 1 is not saved "
                       f"(no earlier epoch to keep). {remedy}, then rerun the same command.")
