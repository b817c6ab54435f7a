"""Shared-memory arrays: the fast path between a parameter server and workers on its node.

Ray's object store copies an array in and out on every put; for a 7.5 MB model that is
several milliseconds per step, more than the gradient sum itself. A worker on the
server's node instead computes its gradient straight into a segment the server reads
(no copy), and its model reads its parameters from the segment the server updates (no
copy either; a relaxed task copies a consistent snapshot).
The order of the steps (a worker's next step waits for the server's update, which
waits for every gradient) is what makes the sharing safe.
"""

from __future__ import annotations

import os
import uuid
from multiprocessing import shared_memory

import numpy as np


class SharedArray:
    """A 1-D numpy array in a named POSIX shared-memory segment (/dev/shm)."""

    def __init__(self, shm: shared_memory.SharedMemory, size: int, dtype, owner: bool):
        self.shm, self.owner = shm, owner
        self.array = np.ndarray((size,), dtype=np.dtype(dtype), buffer=shm.buf)

    @property
    def name(self) -> str:
        return self.shm.name

    @classmethod
    def create(cls, size: int, dtype, tag: str) -> "SharedArray":
        name = f"dptrain-{tag}-{uuid.uuid4().hex[:12]}"
        nbytes = max(1, size * np.dtype(dtype).itemsize)
        return cls(shared_memory.SharedMemory(name=name, create=True, size=nbytes), size, dtype, owner=True)

    @classmethod
    def attach(cls, name: str, size: int, dtype) -> "SharedArray":
        shm = shared_memory.SharedMemory(name=name)
        _untrack(shm)
        return cls(shm, size, dtype, owner=False)

    def close(self) -> None:
        """Drop this process's mapping; the owner also removes the segment."""
        self.array = None
        try:
            self.shm.close()
        except BufferError:  # views still alive somewhere: the mapping goes with the process
            pass
        if self.owner:
            unlink(self.shm.name)


def unlink(name: str) -> bool:
    """Remove a segment by name (True if it existed): a last resort after a crashed actor."""
    try:
        shm = shared_memory.SharedMemory(name=name)
    except FileNotFoundError:
        return False
    shm.close()
    shm.unlink()  # balances the registration that attaching made (before Python 3.13)
    return True


def names(prefix: str) -> list:
    """Segments in this node's /dev/shm whose names start with `prefix`."""
    try:
        return [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
    except OSError:  # no /dev/shm (not Linux): nothing to list
        return []


def sweep_orphans(prefix: str = "dptrain-", min_age_s: float = 60.0) -> list:
    """Remove this node's segments that no living process maps and that are older than
    `min_age_s` (a run killed with SIGKILL, its actors with it, leaves its segments behind);
    returns their names. Linux only (/proc); elsewhere nothing is removed."""
    import time
    candidates = []
    now = time.time()
    for name in names(prefix):
        try:
            if now - os.stat(f"/dev/shm/{name}").st_mtime >= min_age_s:
                candidates.append(name)
        except OSError:
            pass
    if not candidates or not os.path.isdir("/proc/self/map_files"):
        return []
    in_use = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    if "/dev/shm/" + prefix in line:
                        in_use.add(line.rsplit("/dev/shm/", 1)[1].split()[0])
        except OSError:  # gone, or not readable (not one of ours: our actors are our own processes)
            continue
    removed = [n for n in candidates if n not in in_use and unlink(n)]
    return removed


def _untrack(shm) -> None:
    """Before Python 3.13 attaching registers the segment with this process's resource
    tracker, which would unlink it when this process exits: the owner decides instead."""
    try:
        from multiprocessing import resource_tracker
        resource_tracker.unregister(shm._name, "shared_memory")
    except Exception:
        pass
