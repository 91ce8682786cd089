"""common.prefetch: the one background-work helper of both stages (stage 1 views, stage 2 batches and plans)."""
from __future__ import annotations

import threading
import time

import pytest

from common.prefetch import in_background, prefetch


def _slow_square(x: int) -> int:
    time.sleep((x * 7 % 5) * 0.002)  # items finish out of order on several workers
    return x * x


def test_results_come_in_item_order():
    assert list(prefetch(_slow_square, range(20), workers=3, depth=4)) == [x * x for x in range(20)]


def test_no_more_than_depth_items_in_flight():
    depth, started = 3, []
    lock = threading.Lock()

    def work(x):
        with lock:
            started.append(x)
        return x

    for i in prefetch(work, range(12), workers=2, depth=depth):
        time.sleep(0.02)  # give the workers every chance to run further ahead
        with lock:
            # while the consumer holds item i, only items i+1 .. i+depth-1 may have started
            assert max(started) <= i + depth - 1, (i, sorted(started))


def test_an_error_is_raised_at_its_item_after_the_items_before_it():
    def work(x):
        if x == 3:
            raise KeyError("item 3 is bad")
        return x

    got = []
    with pytest.raises(KeyError, match="item 3 is bad"):
        for x in prefetch(work, range(10), workers=2, depth=3):
            got.append(x)
    assert got == [0, 1, 2]


def test_closing_early_stops_the_producers():
    started = []
    gen = prefetch(lambda x: started.append(x) or time.sleep(0.01) or x, range(100), workers=1, depth=3,
                   name="test-early-close")
    assert next(gen) == 0
    gen.close()  # what `break` in a for loop does
    assert max(started) <= 2  # the items not started when the consumer left never run
    assert not [t for t in threading.enumerate() if t.name.startswith("test-early-close")]  # and the thread is gone


def test_zero_workers_computes_in_the_callers_thread():
    me = threading.current_thread()
    assert all(t is me for t in prefetch(lambda _: threading.current_thread(), range(3), workers=0, depth=2))


def test_workers_are_daemon_threads():
    """Unlike ThreadPoolExecutor's, so work nobody collects cannot hold up the interpreter's exit."""
    assert all(prefetch(lambda _: threading.current_thread().daemon, range(4), workers=2, depth=2))
    assert in_background(lambda: threading.current_thread().daemon).result(timeout=10)


def test_in_background_starts_now_and_hands_back_result_or_error():
    gate = threading.Event()
    future = in_background(lambda: gate.set() or 42)
    assert gate.wait(timeout=10)  # running before anyone asks for the result
    assert future.result(timeout=10) == 42

    def broken():
        raise OSError("shard 0 unreadable")

    with pytest.raises(OSError, match="shard 0 unreadable"):
        in_background(broken).result(timeout=10)


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        list(prefetch(abs, range(3), workers=1, depth=0))
