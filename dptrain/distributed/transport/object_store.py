"""Steps over Ray's object store: one parameters object per step out, one gradient per worker back.

The server puts its flat parameters once per step; every worker's
`compute_gradients(params, step)` call receives it (read zero-copy from the shared
object store of the worker's node) and returns its flat gradient, which Ray moves
back to the server's node. It works between any nodes and for GPU workers; on a
2-core machine a 7.5 MB model pays a few milliseconds of copies per step, which is
why co-located CPU workers use shared memory instead.
"""

from __future__ import annotations

from . import OBJECT_STORE, Transport, seconds_left


class ObjectStoreTransport(Transport):
    name = OBJECT_STORE

    def __init__(self, host):
        super().__init__(host)
        self._refs: dict = {}  # rank -> ObjectRef of the step in flight
        self._tasks: dict = {}  # ObjectRef -> (rank, step) of the relaxed tasks in flight
        self._put = (None, None)  # (version, ObjectRef) of the parameters last put for tasks

    def connect(self, workers: dict, step: int) -> None:
        new = {rank: w for rank, w in workers.items() if w not in self.workers.values()}
        self.workers = dict(workers)
        if new:  # a worker that used shared memory (with this server or an old one) drops it
            self.call_all({rank: w.use_object_store.remote() for rank, w in new.items()}, step,
                          timeout=max(self.host.cfg.step_timeout, 60.0))
        self._refs, self._tasks = {}, {}

    def send(self, step: int) -> None:
        if not self.workers:
            return
        import ray
        params = ray.put(self.host.flat.data)  # once for every worker
        self._refs = {rank: w.compute_gradients.remote(params, step) for rank, w in self.workers.items()}

    def receive(self, step: int, deadline: float) -> dict:
        refs, self._refs = self._refs, {}
        return self.call_all(refs, step, timeout=seconds_left(deadline)) if refs else {}

    def evaluate(self, rank: int, split: str, deadline: float) -> dict:
        return self.evaluate_by_call(rank, split, deadline)

    def assign(self, rank: int, task: dict) -> None:
        import ray
        version = self.host.step
        if self._put[0] != version:  # once per version for every task that starts on it
            self._put = (version, ray.put(self.host.flat.data))
        ref = self.workers[rank].compute_task.remote(self._put[1], version, task)
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
            grad, metrics = self.call_all({rank: ref}, step, timeout=0)[rank]
            out.append((rank, grad, metrics))
        return out
