"""Work done ahead of its consumer on background threads: the one implementation.

Both stages overlap producing data with computing on it: stage 1 renders the
next groups of teacher views while the teachers run, stage 2 renders the next
batches while the student trains and plans the next epoch while the current
one runs. All of them go through :func:`prefetch` or :func:`in_background`.

The threads are daemon threads, unlike ``ThreadPoolExecutor``'s (which the
interpreter joins at exit): work nobody will collect -- the plan of an epoch
after the last one -- must not hold up the end of a run.
"""
from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import Future
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _Workers:
    """``count`` daemon threads running submitted calls in submission order."""

    def __init__(self, count: int, name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve, name=name if count == 1 else f"{name}-{i}", daemon=True)
            for i in range(count)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., R], *args) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args))
        return future

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            del job  # a finished job's inputs are not kept alive until the next one arrives
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # noqa: BLE001 - handed to whoever collects the future
                    future.set_exception(e)
            del future, fn, args

    def shutdown(self, wait: bool) -> None:
        """The threads exit once the jobs already queued are done (``wait``: block until then)."""
        for _ in self._threads:
            self._jobs.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


def prefetch(fn: Callable[[T], R], items: Iterable[T], workers: int, depth: int,
             name: str = "prefetch") -> Iterator[R]:
    """``map(fn, items)`` in order, computed on ``workers`` threads ahead of the consumer.

    At most ``depth`` items are in flight, counting the one being handed over:
    while the consumer works on item i, items i+1 .. i+depth-1 are being computed
    (or are done and wait). ``workers <= 0`` computes in the caller's thread.
    ``items`` is iterated in the caller's thread. An error is re-raised at its item; closing
    the generator early (``break``) drops the items not started and waits for the running
    ones, so a loop that stops also stops its producers.
    """
    if workers <= 0:
        yield from map(fn, items)
        return
    if depth < 1:
        raise ValueError(f"prefetch depth must be >= 1, got {depth}")
    pool = _Workers(workers, name)
    pending: deque[Future] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # finished, failed, or closed early by the consumer
        for future in pending:
            future.cancel()  # not started yet: never started
        pool.shutdown(wait=True)


def in_background(fn: Callable[[], R], name: str = "background") -> Future:
    """Start ``fn()`` on a daemon thread now; ``.result()`` waits for it and re-raises its exception."""
    pool = _Workers(1, name)
    future = pool.submit(fn)
    pool.shutdown(wait=False)
    return future
