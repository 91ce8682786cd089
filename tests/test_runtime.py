"""common/runtime.py: device, precision and rank are decided once, from config and env."""
import os

import pytest
import torch

from common.config import ConfigError, RuntimeConfig
from common.runtime import build_runtime


def test_cpu_defaults_to_fp32_without_autocast(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rt = build_runtime(RuntimeConfig())
    assert rt.device.type == "cpu" and rt.dtype == torch.float32
    assert not rt.use_autocast and not rt.channels_last
    assert not rt.grad_scaler().is_enabled()


def test_bf16_on_cpu_autocasts_without_a_scaler():
    rt = build_runtime(RuntimeConfig(device="cpu", precision="bf16"))
    with rt.autocast():
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16
    assert not rt.grad_scaler().is_enabled()


def test_fp16_and_cuda_refused_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="fp16"):
        build_runtime(RuntimeConfig(device="cpu", precision="fp16"))
    with pytest.raises(ConfigError, match="CUDA is not available"):
        build_runtime(RuntimeConfig(device="cuda"))


def test_rank_and_world_from_torchrun_env(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    rt = build_runtime(RuntimeConfig(device="cpu"), init_distributed=False)
    assert (rt.rank, rt.world_size, rt.local_rank) == (3, 4, 1)
    assert rt.distributed and not rt.is_main and not rt.progress


def test_torch_threads_leave_the_decode_workers_their_cores(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)))
    build_runtime(RuntimeConfig(device="cpu", num_workers=2))
    assert calls == [1]  # 2 cores - 2 decode threads: never below 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    build_runtime(RuntimeConfig(device="cpu", num_workers=2))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: 2 ranks share the 8 cores
    build_runtime(RuntimeConfig(device="cpu", num_workers=1), init_distributed=False)
    build_runtime(RuntimeConfig(device="cpu", torch_threads=5), init_distributed=False)
    assert calls == [1, 6, 3, 5]
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's explicit choice: torch already follows it
    build_runtime(RuntimeConfig(device="cpu"), init_distributed=False)
    assert calls == [1, 6, 3, 5]
