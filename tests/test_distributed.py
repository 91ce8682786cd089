"""common.distributed on 2 real gloo ranks (spawned processes, no torchrun): outcomes, JSON gather, buffers."""
from __future__ import annotations

import json
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
