"""One run per run directory: an exclusive ``flock`` on ``RUN/run.lock`` for the life of the run.

Two `pipeline distill/train` processes writing one ``--out`` would both
append to metrics.jsonl (duplicated epochs) and overwrite each other's
checkpoints. So the process that writes the run directory (rank 0) takes
an exclusive, non-blocking ``flock`` on ``RUN/run.lock`` before it reads
or writes anything there, and writes its pid, host and start time into
the file. A second run into the same directory is refused at once,
naming that holder.

The lock belongs to the open file, not to the file's existence: when the
holder exits or is killed (even ``kill -9``), the kernel releases it, so
the ``run.lock`` a crashed run leaves behind does not block a rerun or
``--resume``; its pid/host text is only a description of the last holder.
The file is therefore never deleted: unlinking a lock file races with a
process that has just opened it (both would end up "holding" a lock).

Network filesystems: on Linux, ``flock`` on NFS is sent to the server as a
whole-file POSIX lock (kernels >= 2.6.12), so it excludes processes on other
hosts only when the mount has working locking (NFSv4, or NFSv3 with lockd);
mounted with ``nolock`` or ``local_lock=flock|all``, the lock is local to one
host and two hosts can both run into the same directory. Lustre needs the
``flock`` mount option (``localflock`` is per host, and without either flock
fails). A filesystem that cannot lock at all does not stop the run: it
prints a warning and continues unguarded.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from stage2_student_distill.checkpoint import RunError, writing

LOCK_NAME = "run.lock"


class RunDirLock(contextlib.AbstractContextManager):
    """Held from construction until :meth:`release` (or the process's end); a context manager."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        with writing(self.path):  # a read-only or full filesystem: one line naming the file
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # O_RDWR without O_TRUNC: a refused run must not erase the holder's description.
            self.fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            self._lock()
            with writing(self.path):
                holder = {"pid": os.getpid(), "host": socket.gethostname(),
                          "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, (json.dumps(holder) + "\n").encode(), 0)
        except BaseException:
            self.release()
            raise

    def _lock(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(
                f"{self.path.parent} is in use by another run ({_describe(self.fd)}); wait for it to finish or "
                "stop it, or choose another --out (the lock is released when that process exits, even if killed)"
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            print(f"warning: cannot lock {self.path} ({e.strerror}: this filesystem does not support flock); "
                  "a second run into this directory would not be refused", file=sys.stderr, flush=True)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(fd: int) -> str:
    """"pid P on host H since T" from the lock file (what its holder wrote), as far as it is readable."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {holder['pid']} on host {holder['host']} since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        # The holder has the lock but has not written its description yet (or wrote something else).
        return "its pid and host are not recorded yet"
