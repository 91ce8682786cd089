"""Work that may fail on one rank, with every rank told the outcome.

Under torchrun a rank that raises leaves its peers blocked in their next
collective: they see the failure only as a lost connection (gloo: a
``RuntimeError`` traceback) or, with NCCL or on other hosts, after the
collective timeout. So work that can fail on some ranks only -- rank 0's
writes, inputs one host reads differently -- runs inside
``fail_together(runtime)``: on leaving the block the ranks exchange their
outcomes, and if any rank failed, every rank raises (the failing rank its own
error, the others a ``PeerError`` quoting it), so each rank prints one message
and exits 1.

Long work must not run on one rank while the others wait in a collective (its
length would count against their timeout): share it out instead, and combine
the results with ``all_gather_json``.

Outcomes travel as JSON, never pickle: nothing a peer sends is executed.
"""
from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator

import torch
import torch.distributed as dist

from common.runtime import Runtime


class PeerError(ValueError):
    """Another rank failed; this rank stops with that rank's message."""


def all_gather_json(runtime: Runtime, value: Any) -> list[Any]:
    """Every rank's JSON-serialisable ``value``, in rank order (``[value]`` without torchrun)."""
    if not (runtime.distributed and dist.is_initialized()):
        return [value]
    payload = json.dumps(value).encode()
    # The tensors live on the runtime's device: NCCL only moves CUDA tensors.
    size = torch.tensor([len(payload)], dtype=torch.int64, device=runtime.device)
    sizes = [torch.empty_like(size) for _ in range(runtime.world_size)]
    dist.all_gather(sizes, size)
    lengths = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(lengths), dtype=torch.uint8)
    padded[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    padded = padded.to(runtime.device)
    gathered = [torch.empty_like(padded) for _ in range(runtime.world_size)]
    dist.all_gather(gathered, padded)
    return [json.loads(bytes(g[:n].cpu().numpy())) for g, n in zip(gathered, lengths)]


@contextlib.contextmanager
def fail_together(runtime: Runtime) -> Iterator[None]:
    """Run the block on every rank, then exchange outcomes; raise on every rank if any rank failed.

    Every rank must enter the block (it ends in a collective). A failing rank
    re-raises its own error, unchanged; if the exchange itself fails (a peer
    is already gone), the original error still wins, and a rank that did not
    fail reports the lost peer (``peer_may_be_gone``).
    """
    if not (runtime.distributed and dist.is_initialized()):
        yield
        return
    try:
        yield
    except Exception as error:
        # what the peers print: the text the CLI shows for a user error, else type and text
        message = str(error) if isinstance(error, (ValueError, OSError)) else f"{type(error).__name__}: {error}"
        with contextlib.suppress(Exception):
            all_gather_json(runtime, message)
        raise
    with peer_may_be_gone("the other ranks to finish this step"):  # a peer that failed before the block
        outcomes = all_gather_json(runtime, None)
    failures = [(rank, message) for rank, message in enumerate(outcomes) if message is not None]
    if failures:
        rank, message = failures[0]
        raise PeerError(f"rank {rank} of {runtime.world_size} stopped: {message}")


@contextlib.contextmanager
def peer_may_be_gone(waiting_for: str) -> Iterator[None]:
    """Around a collective that a failed peer will never reach: the lost connection (gloo raises a
    ``RuntimeError`` once the peer's process is gone) becomes one message instead of a traceback."""
    try:
        yield
    except RuntimeError as error:
        first = (str(error).splitlines() or [""])[0][:200]
        raise PeerError(
            f"another rank stopped while this one was waiting for {waiting_for} ({type(error).__name__}: {first}); "
            "its own error is in its output"
        ) from error


def broadcast_buffers(runtime: Runtime, *modules: torch.nn.Module | None) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics) of ``modules``.

    DDP broadcasts buffers at the start of each forward, so after an epoch's
    last step every rank holds the statistics of its own last batch: without
    this, each rank would validate its share with a slightly different model
    than the one rank 0 checkpoints.
    """
    if not (runtime.distributed and dist.is_initialized()):
        return
    for module in modules:
        for buffer in module.buffers() if module is not None else ():
            dist.broadcast(buffer, src=0)
