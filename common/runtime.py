"""Where and how the math runs, decided once per process.

Every command builds one ``Runtime`` from ``[runtime]`` and passes it down, so
no other module asks "is CUDA here?" or reads torchrun's environment.
"""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from common.config import ConfigError, RuntimeConfig

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # autocast dtype; float32 means no autocast
    channels_last: bool
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    compile: bool = False
    num_workers: int = 2
    progress: bool = True

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def use_autocast(self) -> bool:
        return self.dtype != torch.float32

    def autocast(self):
        if not self.use_autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling is needed for fp16 only; bf16 has fp32's exponent range."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device``; to CUDA through pinned memory and ``non_blocking``, because a copy
    from pageable memory makes the host wait for the whole GPU queue first."""
    if device is None or torch.device(device).type != "cuda":
        return t if device is None else t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def intra_op_threads(cfg: RuntimeConfig, local_ranks: int = 1) -> int | None:
    """Torch intra-op threads per process: ``torch_threads``, or (0) the cores left to the math.

    The decode workers are threads of the same process that run alongside the
    model, so torch's default of one intra-op thread per core oversubscribes
    the CPU: on 2 cores, 2 intra-op threads + 2 decode threads make every op
    wait for the thread that was preempted, and the process burnt 4-5x the CPU
    for the same steps (docs/performance.md, "Threads"). 0 therefore gives
    each of ``local_ranks`` processes its share of the cores minus its decode
    workers, never below 1. None: leave torch alone, because the user set
    ``OMP_NUM_THREADS`` (torch already follows it).
    """
    if cfg.torch_threads:
        return cfg.torch_threads
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    return max(1, usable_cores() // max(1, local_ranks) - cfg.num_workers)


def build_runtime(cfg: RuntimeConfig, init_distributed: bool = True) -> Runtime:
    """Resolve device/precision and, under torchrun, join the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    if threads := intra_op_threads(cfg, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))):
        torch.set_num_threads(threads)
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"runtime.device = {cfg.device!r} but CUDA is not available here; use device = \"auto\" or \"cpu\""
            )
        if device.type == "cuda" and world_size > 1:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(
            f"runtime.device = {cfg.device!r} means cuda:{device.index or 0} here, but this machine shows {count} "
            f"CUDA device(s) (cuda:0..cuda:{count - 1}, after CUDA_VISIBLE_DEVICES); "
            + (f"under torchrun each local rank takes cuda:LOCAL_RANK: start at most {count} processes per node"
               if world_size > 1 else "use one of those, \"cuda\" or \"auto\"")
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    if cfg.precision == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = _DTYPES[cfg.precision]
    if dtype == torch.float16 and device.type != "cuda":
        raise ConfigError("runtime.precision = \"fp16\" needs CUDA; use fp32 or bf16 on CPU")

    if world_size > 1 and init_distributed and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world_size)

    return Runtime(
        device=device,
        dtype=dtype,
        channels_last=cfg.channels_last and device.type == "cuda",
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        compile=cfg.compile,
        num_workers=cfg.num_workers,
        progress=cfg.progress and rank == 0,
    )
