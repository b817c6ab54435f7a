"""Steps over Ray's object store: one parameters object per step out, one payload per worker back.

The server puts its flat parameters once per step; every worker's `compute(request,
params)` call receives it (read zero-copy from the shared object store of the worker's
node) and returns its reply and payload, which Ray moves back to the server's node. It
works between any nodes and for GPU workers; on a 2-core machine a 7.5 MB model pays a
few milliseconds of copies per step, which is why co-located CPU workers use shared
memory instead.

With sharded servers (--servers K, shards.py) the update's `outgoing` is its K ranges and
the references to the shards' newest slices: a worker's call gets them as K arguments and
returns its reply and K payload slices as K + 1 objects, whose references the Gradient
carries to the shards, which fetch them from the worker's node.
"""

from __future__ import annotations

import numpy as np

from ..messages import Gradient, Request, ServerView
from . import OBJECT_STORE, Transport, seconds_left, shared_argument


class ObjectStoreTransport(Transport):
    name = OBJECT_STORE

    def __init__(self, view: ServerView):
        super().__init__(view)
        self._refs: dict = {}  # rank -> ObjectRef of the step in flight (of its reply, with ranges)
        self._slices: dict = {}  # with ranges: rank -> the K ObjectRefs of its payload's slices
        self._tasks: dict = {}  # ObjectRef -> (rank, step) of the relaxed tasks in flight
        self._put = (None, None)  # (version, ObjectRef) of the parameters last put for tasks

    def connect(self, workers: dict, step: int) -> None:
        new = {rank: w for rank, w in workers.items() if w not in self.workers.values()}
        self.workers = dict(workers)
        if new:  # a worker that used shared memory (with this server or an old one) drops it
            self.call_all({rank: w.use_object_store.remote() for rank, w in new.items()}, step,
                          timeout=max(self.view.step_timeout, 60.0))
        self._refs, self._tasks = {}, {}

    def send(self, step: int) -> None:
        if not self.workers:
            return
        ranges, parts = self.view.outgoing()
        parts = [shared_argument(p) if isinstance(p, np.ndarray) else p for p in parts]  # once for every worker
        request = Request(step, ranges=ranges)
        if ranges is None:
            self._refs = {rank: w.compute.remote(request, *parts) for rank, w in self.workers.items()}
            return
        for rank, w in self.workers.items():  # the payload's slices stay on the worker's node
            reply, *slices = w.compute.options(num_returns=len(ranges) + 1).remote(request, *parts)
            self._refs[rank], self._slices[rank] = reply, slices

    def receive(self, step: int, deadline: float) -> dict:
        refs, self._refs = self._refs, {}
        results = self.call_all(refs, step, timeout=seconds_left(deadline)) if refs else {}
        if self._slices:
            slices, self._slices = self._slices, {}
            return {rank: Gradient(slices[rank], reply["meta"], reply["metrics"]) for rank, reply in results.items()}
        return {rank: _gradient(result) for rank, result in results.items()}

    def assign(self, rank: int, task: dict) -> None:
        version = self.view.version()
        if self._put[0] != version:  # once per version for every task that starts on it
            self._put = (version, shared_argument(self.view.parameters()))
        ref = self.workers[rank].compute.remote(Request.task(task, version), self._put[1])
        self._tasks[ref] = (rank, task["step"])

    def poll(self, timeout: float) -> list:
        import ray
        if not self._tasks:
            return []
        refs = list(self._tasks)
        done, _ = ray.wait(refs, num_returns=1, timeout=max(timeout, 0.0))
        if done:  # and whatever else has finished meanwhile
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        out = []
        for ref in done:
            rank, step = self._tasks.pop(ref)
            out.append((rank, _gradient(self.call_all({rank: ref}, step, timeout=0)[rank])))
        return out


def _gradient(result: tuple) -> Gradient:
    """A Gradient from a worker's `compute` result: (reply, *parts)."""
    reply, *parts = result
    return Gradient(parts, reply["meta"], reply["metrics"])
