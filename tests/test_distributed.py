"""common.distributed on 2 real gloo ranks (spawned processes, no torchrun): outcomes, JSON gather, buffers."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common.distributed import PeerError, all_gather_json, broadcast_buffers, fail_together
from common.runtime import Runtime


def _outcome(block) -> list[str] | None:
    try:
        block()
    except Exception as e:
        return [type(e).__name__, str(e)]
    return None


def _rank(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    rt = Runtime(device=torch.device("cpu"), dtype=torch.float32, channels_last=False, rank=rank, world_size=2)
    result: dict = {"gathered": all_gather_json(rt, {"rank": rank, "text": "é" * (3 * rank + 1)})}

    def rank1_fails():
        with fail_together(rt):
            if rank == 1:
                raise FileNotFoundError(2, "No such file or directory", "/data/val.parquet")

    def all_fail():
        with fail_together(rt):
            raise RuntimeError(f"bug on rank {rank}")

    def nobody_fails():
        with fail_together(rt):
            pass

    result["rank1_fails"] = _outcome(rank1_fails)
    result["all_fail"] = _outcome(all_fail)
    result["nobody_fails"] = _outcome(nobody_fails)
    bn = torch.nn.BatchNorm1d(2)
    bn.running_mean.fill_(float(rank + 1))
    broadcast_buffers(rt, bn, None)
    result["running_mean"] = bn.running_mean.tolist()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_every_rank_learns_the_outcome(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    expected = [{"rank": 0, "text": "é"}, {"rank": 1, "text": "éééé"}]  # unequal lengths, non-ASCII
    assert r0["gathered"] == r1["gathered"] == expected
    # the failing rank keeps its own error; the other stops with its message
    assert r1["rank1_fails"] == ["FileNotFoundError", "[Errno 2] No such file or directory: '/data/val.parquet'"]
    assert r0["rank1_fails"] == [PeerError.__name__,
                                 "rank 1 of 2 stopped: [Errno 2] No such file or directory: '/data/val.parquet'"]
    # every rank that failed re-raises its own error, whatever its type
    assert r0["all_fail"] == ["RuntimeError", "bug on rank 0"] and r1["all_fail"] == ["RuntimeError", "bug on rank 1"]
    assert r0["nobody_fails"] is None and r1["nobody_fails"] is None
    assert r0["running_mean"] == r1["running_mean"] == [1.0, 1.0]  # rank 0's buffers everywhere


def _rank_that_may_vanish(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    if rank == 1:
        os._exit(3)  # dies before the step, as a rank does that failed outside any exchange
    rt = Runtime(device=torch.device("cpu"), dtype=torch.float32, channels_last=False, rank=rank, world_size=2)

    def step():
        with fail_together(rt):
            pass

    Path(out_dir, "rank0.json").write_text(json.dumps(_outcome(step)))
    os._exit(0)  # skip the process group's teardown, which would wait for the dead peer


def test_a_vanished_peer_is_reported_not_a_traceback(tmp_path):
    context = mp.start_processes(_rank_that_may_vanish, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                                 join=False, start_method="spawn")
    for process in context.processes:  # not context.join(): it would kill rank 0 once rank 1 has died
        process.join(timeout=120)
    assert [process.exitcode for process in context.processes] == [0, 3]
    kind, message = json.loads((tmp_path / "rank0.json").read_text())
    assert kind == PeerError.__name__
    assert message.startswith("another rank stopped while this one was waiting for the other ranks to finish this step")
