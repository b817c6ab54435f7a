"""Steps over Ray's object store: one parameters object per step out, one gradient per worker back.

The server puts its flat parameters once per step; every worker's
`compute_gradients(params, step)` call receives it (read zero-copy from the shared
object store of the worker's node) and returns its flat gradient, which Ray moves
back to the server's node. It works between any nodes and for GPU workers; on a
2-core machine a 7.5 MB model pays a few milliseconds of copies per step, which is
why co-located CPU workers use shared memory instead.

With sharded servers (--servers K, shards.py) a worker's call gets the K shards' newest
slices as K objects and returns its metrics and K gradient slices as K + 1 objects;
the server keeps the references for the shards' update.
"""

from __future__ import annotations

from . import OBJECT_STORE, Transport, seconds_left


class ObjectStoreTransport(Transport):
    name = OBJECT_STORE

    def __init__(self, host):
        super().__init__(host)
        self._refs: dict = {}  # rank -> ObjectRef of the step in flight (sharded: of its metrics)
        self._slices: dict = {}  # sharded: rank -> the K ObjectRefs of its gradient's slices
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
        shards = self.host.shards
        if shards is not None:  # the shards' newest slices in, one gradient slice per shard out
            k = len(shards.bounds)
            for rank, w in self.workers.items():
                metrics, *slices = w.compute_sharded.options(num_returns=k + 1).remote(step, shards.bounds,
                                                                                        *shards.refs)
                self._refs[rank], self._slices[rank] = metrics, slices
            return
        import ray
        params = ray.put(self.host.flat.data)  # once for every worker
        self._refs = {rank: w.compute_gradients.remote(params, step) for rank, w in self.workers.items()}

    def receive(self, step: int, deadline: float) -> dict:
        refs, self._refs = self._refs, {}
        results = self.call_all(refs, step, timeout=seconds_left(deadline)) if refs else {}
        if self.host.shards is not None:  # (the slices' references, metrics)
            slices, self._slices = self._slices, {}
            return {rank: (slices[rank], metrics) for rank, metrics in results.items()}
        return results

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
