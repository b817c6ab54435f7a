"""Steps over shared memory and a control channel: CPU workers on the server's node.

The server's flat parameters live in a shared-memory segment (shm.py) that these
workers map read-only and compute on in place (their models' parameters are views of
it: nothing is copied); each worker's backward writes its gradient straight into a
segment of its own that the server maps. What is left of a step's communication
is "compute step k" and a small dict of metrics back, over a Unix socket per
worker (control.py): tens of microseconds where a Ray call costs about a
millisecond. The order of a step (a worker's next step waits for the server's
update, which waits for every gradient) is what makes the sharing safe.

A session: the server listens, calls each worker's `serve` once (an ordinary Ray
call that stays running), the worker connects and says its rank, then loops over
requests until the server says stop or goes away. While serving, a worker takes
no other Ray call, so `pause` ends every session before the server changes its
setup.

Requests: {"op": "step", "step": k} -> {"metrics": ..., "meta": [...]} (the worker's
`compute` reply; the gradient, or its payload, lies in the worker's segment);
{"op": "evaluate", "split": s, "part": r, "of": n} -> {"evaluation": ...} (the
worker's part of an evaluation); {"op": "task", "step": k, "shard": j, "of": n} -> like a step, the metrics with
"version"; {"op": "stop"}. A failure is answered with {"error": message}.

Relaxed steps (relaxed.py) break that order: a task may start while the server
updates, so it computes on a private copy of the parameters. A small header segment, [sequence, version], makes each task's read of the
parameters a consistent snapshot (a seqlock): the server makes the sequence odd
before an update and even after it, and a worker copies the parameters between two
reads of an even, unchanged sequence, else again. (x86 keeps stores in order and
loads in order, which is what this needs; on a weaker memory model it would need
fences.)
"""

from __future__ import annotations

import dataclasses
import select
import time

import numpy as np

from ..errors import WorkerError, WorkerLost
from ..messages import Evaluate, Gradient, Request, SegmentSpec, ServerView
from . import SHARED_MEMORY, Transport, control
from .shm import SharedArray, unlink

class SharedMemoryTransport(Transport):
    name = SHARED_MEMORY

    def __init__(self, view: ServerView):
        super().__init__(view)
        self._params: SharedArray | None = None  # the server's parameters, once moved into shared memory
        self._grads: dict = {}  # actor -> the SharedArray its backward writes (mapped here)
        self._sessions = control.Sessions(view.run_key, view.step_timeout, WorkerLost, _failed)  # by rank
        self._by_rank: dict = {}  # rank -> its gradient segment (what receive hands out every step)
        self._header: SharedArray | None = None  # [sequence, version] of the parameters (a seqlock)
        self._tasks: dict = {}  # rank -> step of its relaxed task in flight

    reuses_buffers = True  # a worker's gradient segment is its next task's too

    def connect(self, workers: dict, step: int) -> None:
        self.pause()
        for actor in [a for a in self._grads if a not in workers.values()]:  # lost, or moved elsewhere:
            seg = self._grads.pop(actor)  # its owner is dead or drops the segment itself
            seg.close()
            unlink(seg.name)
        new = {rank: w for rank, w in workers.items() if w not in self._grads}
        self.workers = dict(workers)
        self._by_rank = {}
        if not new:
            self._by_rank = {rank: self._grads[w] for rank, w in workers.items()}
            return
        view = self.view
        if self._params is None:
            self._params = SharedArray.create(view.size, view.dtype, f"{view.run_key}-params")
            view.place(self._params.array, self._params.name)
            self._header = SharedArray.create(2, "int64", f"{view.run_key}-pver")
            self._header.array[:] = (0, view.version())
        spec = SegmentSpec(params=self._params.name, header=self._header.name, size=view.size, dtype=str(view.dtype),
                           tag=view.run_key)
        names = self.call_all({rank: w.use_shared_memory.remote(spec) for rank, w in new.items()}, step,
                              timeout=max(view.step_timeout, 60.0))
        for rank, name in names.items():
            self._grads[new[rank]] = SharedArray.attach(name, spec.size, spec.dtype)
        self._by_rank = {rank: self._grads[w] for rank, w in workers.items()}

    def send(self, step: int) -> None:
        self._open_sessions(step)
        message = {"op": "step", **Request(step).to_dict()}
        for rank in self._sessions.keys():
            self._sessions.send(rank, message, step)

    def receive(self, step: int, deadline: float) -> dict:
        return {rank: self._gradient(rank, self._reply(rank, step, deadline)) for rank in self._sessions.keys()}

    def _gradient(self, rank: int, reply: dict) -> Gradient:
        seg = self._by_rank[rank]
        return Gradient([seg.array], reply["meta"], reply["metrics"], segment=seg.name)

    def send_evaluation(self, split: str, of: int, final: bool = False) -> None:
        step = self.view.version()
        self._open_sessions(step)
        for rank in self._sessions.keys():
            self._sessions.send(rank, {"op": "evaluate", **Evaluate(split, rank, of, final).to_dict()}, step)

    def receive_evaluation(self, deadline: float) -> dict:
        step = self.view.version()
        return {rank: self._reply(rank, step, deadline)["evaluation"] for rank in self._sessions.keys()}

    def updating(self, begins: bool, version: int) -> None:
        if self._header is not None:
            header = self._header.array
            if begins:
                header[0] += 1  # odd: an update is under way
            else:
                header[1] = version
                header[0] += 1  # even again, and another snapshot than before

    def assign(self, rank: int, task: dict) -> None:
        self._open_sessions(task["step"])
        self._sessions.send(rank, {"op": "task", **Request.task(task).to_dict()}, task["step"])
        self._tasks[rank] = task["step"]

    def poll(self, timeout: float) -> list:
        waiting = {self._sessions.channel(rank).sock: rank for rank in self._tasks}
        if not waiting:
            return []
        readable, _, _ = select.select(list(waiting), [], [], max(timeout, 0.0))
        out = []
        for sock in readable:
            rank = waiting[sock]
            step = self._tasks.pop(rank)
            reply = self._reply(rank, step, time.monotonic() + self.view.step_timeout)
            out.append((rank, self._gradient(rank, reply)))
        return out

    def pause(self) -> None:
        self._tasks = {}
        self._sessions.close()

    def close(self) -> None:
        super().close()
        self._by_rank = {}
        for seg in [self._params, self._header, *self._grads.values()]:
            if seg is not None:
                seg.close()
        self._params, self._header, self._grads = None, None, {}

    # ------------------------------------------------------------------ sessions

    def _open_sessions(self, step: int) -> None:
        """Start a session with every worker carried that has none."""
        self._sessions.open(self.workers, lambda w, address, secret: w.serve.remote(address, secret), step)

    def _reply(self, rank: int, step: int, deadline: float) -> dict:
        """Worker `rank`'s answer on its channel; WorkerLost if it dies or misses `deadline`."""
        reply = self._sessions.reply(rank, step, deadline)
        if "error" in reply:
            raise WorkerError(reply["error"])
        return reply


def _failed(rank: int, step: int, message: str) -> WorkerError:
    return WorkerError(f"worker {rank} failed at step {step}: {message}")


class WorkerLink:
    """A worker's end: the server's parameters mapped read-only, and the segment its backward
    writes the gradient into (created here, removed by `close`).

    For steps and evaluations the model reads its parameters in place, from the server's
    segment (`Replica.bind_parameters`): nothing is copied, and the step's order keeps the
    server from writing while they are read. A relaxed task may run while the server updates,
    so it computes on a private snapshot instead (`snapshot`)."""

    def __init__(self, worker, spec: SegmentSpec):
        self.worker = worker
        replica = worker.replica
        self.params = SharedArray.attach(spec.params, spec.size, spec.dtype)
        self.params.array.flags.writeable = False  # workers never write parameters
        self.header = SharedArray.attach(spec.header, 2, "int64")
        self.grad = SharedArray.create(spec.size, spec.dtype, f"{spec.tag}-grad{worker.rank}")
        if worker.codec.writes_in_place:  # dense: backward writes the gradient straight here
            replica.bind_gradients(self.grad.array)
        self.payload = self.grad.array.view(np.uint8)  # else: the compressed gradient is written here
        self.in_place = False
        self.read_in_place()

    def read_in_place(self) -> None:
        """From now on the model's parameters are views of the server's segment."""
        if not self.in_place:
            self.worker.replica.bind_parameters(self.params.array)
            self.in_place = True

    def snapshot(self) -> int:
        """Copy the server's parameters into a private buffer of the model as one version, even
        while it updates them (the seqlock of the module's docstring); returns that version."""
        header, replica = self.header.array, self.worker.replica
        if self.in_place:
            replica.bind_parameters(None)
            self.in_place = False
        while True:
            before = int(header[0])
            if before % 2:  # an update is under way
                time.sleep(0.0001)
                continue
            version = int(header[1])
            replica.load_parameters(self.params.array)
            if int(header[0]) == before:
                return version

    def serve(self, address: str, secret: str) -> int:
        """Take the server's requests until it says stop or goes away; how many were served.
        `secret`: what this session's hello must say (control.py: who may connect)."""
        return control.serve(address, self.worker.rank, secret, self.answer)

    def answer(self, request: dict) -> dict:
        """One request's reply; the gradient goes into our segment (its payload, with --compress)."""
        worker, op = self.worker, request.get("op")
        if op == "task":  # any shard of any step, on a consistent snapshot of the parameters
            task = dataclasses.replace(Request.from_dict(request), version=self.snapshot())
            return worker.compute(task, into=self.payload)[0]
        if op == "step":  # the server updates nothing until every gradient is in
            self.read_in_place()
            return worker.compute(Request.from_dict(request), into=self.payload)[0]
        if op == "evaluate":  # nor during an evaluation (relaxed steps settle first)
            self.read_in_place()
            return {"evaluation": worker.evaluate(Evaluate(
                request["split"], int(request["part"]), int(request["of"]), bool(request.get("final"))))}
        return {"error": f"worker {worker.rank}: unknown request {op!r}"}

    def close(self) -> None:
        replica = self.worker.replica
        if self.in_place:  # no views of the segments may outlive them: the model keeps a copy
            replica.bind_parameters(None)
            self.in_place = False
        replica.bind_gradients(None)
        self.payload = None
        self.params.close()
        self.header.close()
        self.grad.close()
