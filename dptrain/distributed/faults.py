"""Fault injection for tests and scripts/soak.py, kept out of the production classes.

A fault is a dict: {"rank": r, "step": k, "kind": raise|exit|nan|hang[, "seconds": s]}
for worker r (at the first step it computes from k on: with bounded staleness a
worker may compute no shard of step k), {"rank": r, "kind": "slow_connect", "seconds": s}
(worker r waits s seconds before it joins each control-channel session: a window in
which tests race it with an impostor), or {"role": "server", "step": k, "kind":
exit|hang} for the server, or {"role": "shard", "index": j, "step": k, "kind": exit|hang}
for server shard j (--servers K > 1), at its update of step k.
raise: an exception in the worker's code; exit: the process dies; nan: a NaN in the
gradient; hang: a sleep (an hour unless `seconds`); evaluation_exit: the process dies in
the held-out evaluation that follows step k (an epoch's end or --eval-every's). The trainer spawns these
subclasses only when it is given faults; a replacement actor gets only the faults
of steps not yet reached, so it does not repeat the one that killed its predecessor.
(What a dead machine does is tested from outside the library: tests/test_cluster_faults.py.)
"""

from __future__ import annotations

import os
import time

from .server import ParameterServer
from .shards import ServerShard
from .worker import Worker

WORKER_KINDS = ("raise", "exit", "nan", "hang", "slow_connect", "evaluation_exit")
SERVER_KINDS = ("exit", "hang")


def check(faults: list) -> None:
    """ValueError naming a fault that is not one of the kinds above."""
    for fault in faults:
        kinds = SERVER_KINDS if fault.get("role") in ("server", "shard") else WORKER_KINDS
        if fault.get("role") in (None, "worker", "server", "shard") and fault.get("kind") not in kinds:
            raise ValueError(f"unknown fault kind {fault.get('kind')!r} in {fault}; expected one of {kinds}")


def for_worker(faults: list | None, rank: int) -> dict:
    """step -> fault, of worker `rank` (those of a step)."""
    return {f["step"]: f for f in faults or [] if f.get("role", "worker") == "worker" and f.get("rank") == rank
            and "step" in f}


def pending(faults: list, submitted: int) -> list:
    """The faults a replacement actor still gets: those of steps after `submitted`, and those of no step."""
    return [f for f in faults if f.get("step", submitted + 1) > submitted]


def for_server(faults: list | None, role: str = "server", index: int | None = None) -> dict:
    """step -> fault, of the server (or of server shard `index`)."""
    return {f["step"]: f for f in faults or [] if f.get("role") == role and f.get("index") == index}


def _server_fault(fault: dict | None) -> None:
    if fault and fault["kind"] == "exit":  # the process dies, or hangs, before the step
        os._exit(1)
    if fault and fault["kind"] == "hang":
        time.sleep(fault.get("seconds", 3600))


class FaultyWorker(Worker):
    def __init__(self, *args, faults: list | None = None):
        super().__init__(*args)
        self.faults = for_worker(faults, self.rank)
        self.computed = None  # the step this worker last computed (evaluation_exit dies in the evaluation after it)
        self.connect_delay = max([f.get("seconds", 1.0) for f in faults or [] if f.get("kind") == "slow_connect"
                                  and f.get("rank") == self.rank], default=0.0)

    def serve(self, address: str, secret: str) -> int:
        time.sleep(self.connect_delay)
        return super().serve(address, secret)

    def _gradient(self, request):
        # at the first step computed at or after the fault's (a relaxed run's worker may skip steps)
        step = request.step
        self.computed = step
        due = [s for s in self.faults if s <= step and self.faults[s]["kind"] != "evaluation_exit"]
        fault = self.faults.pop(min(due)) if due else None
        kind = fault and fault["kind"]
        if kind == "raise":
            raise RuntimeError(f"injected fault (rank {self.rank}, step {step})")
        if kind == "exit":
            os._exit(1)
        if kind == "hang":
            time.sleep(fault.get("seconds", 3600))
        metrics = super()._gradient(request)
        if kind == "nan":
            self.replica.flat.grad[0] = float("nan")
            metrics["finite"] = False
        return metrics

    def evaluate(self, request, params=None):
        fault = self.faults.get(self.computed)
        if fault and fault["kind"] == "evaluation_exit":  # in the evaluation after that step
            os._exit(1)
        return super().evaluate(request, params)


class FaultyServer(ParameterServer):
    def __init__(self, *args, faults: list | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.faults = for_server(faults)

    def starting(self, step: int) -> None:
        _server_fault(self.faults.get(step))


class FaultyShard(ServerShard):
    def __init__(self, *args, faults: list | None = None):
        super().__init__(*args)
        self.faults = for_server(faults, "shard", self.index)

    def starting(self, step: int) -> None:
        _server_fault(self.faults.pop(step, None))
        super().starting(step)
