"""Relaxed steps for runs with stragglers: bounded staleness and backup workers.

A synchronous step waits for its slowest worker. The parameter server can instead
run one of two relaxed loops (`--staleness TAU` or `--backup-workers B`), both built
from *tasks*: "the gradient of shard j of n of step k's batch, on the newest
parameters" (`Transport.assign`), answered with the gradient of that shard's loss
sum and the parameter version it was computed on (`Transport.poll`). A version is
the number of updates applied; step k's update makes version k + 1.

**Bounded staleness** (stale synchronous parallel; Ho et al. 2013, Li et al. 2014).
Step k's batch is cut into N shards (N workers), as in the synchronous step, but the
shards of all steps form one queue, handed out in order to whichever worker is free,
as long as task k may start: k <= version + TAU. Step k's update is the synchronous
one (the mean gradient of all of batch k, the schedule's learning rate for k, one
optimizer step) and happens once all N shards of k are in; the shards were computed
on versions k - TAU .. k. So every example of an epoch is used exactly once, the
learning rate means what it means in a synchronous run, a slow worker simply takes
fewer shards, and no gradient is ever applied more than TAU versions after the
version it was computed on. TAU = 0 is the synchronous step itself (the server runs
that loop instead); TAU = inf removes the bound. Each step record lists
[rank, shard, version] of its gradients.

**Backup workers** (Chen et al. 2016). N + B workers; step k's batch is cut into
N + B shards, worker r computing shard r, all on version k. The update averages the
first N gradients to arrive, the exact mean over the examples they cover; the late
shards' examples are skipped for that step. Each record lists the ranks counted and
dropped. The choice is the run's only non-determinism, so it is written down
(<out>/checkpoints/decisions.jsonl): a run resumed or recovered from a checkpoint
counts the same ranks at the steps it replays, and ends bit-exactly where the
original did.

Faults: a lost worker loses the server no state but what is in flight; after
recovery the tasks of every step not yet applied are handed out again, so no
example is lost. A checkpoint holds the applied version (its step) and lists what
was in flight, which a resume computes again. Epoch-end evaluations and checkpoints
see the parameters of exactly their step: the loop lets the tasks in flight finish
(keeping their gradients) before an evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import numpy as np

from .loops import StepLoop
from .messages import ServerView


DECISIONS = "decisions.jsonl"


class Relaxed(StepLoop):
    """The relaxed step loop (loops.py's seam) over the server `view`: bounded staleness `tau`
    (0 with backup workers), or `backups` backup workers."""

    workers_wait_for_update = False  # tasks are computed during updates

    def __init__(self, view: ServerView, tau: float, backups: int):
        self.view = view
        self.tau = tau
        self.backups = backups
        self.plan: dict = {}  # step -> the ranks a backup-worker step counted (replayed as they were)
        self._pool: list = []  # spare gradient buffers (bounded staleness over reused buffers)
        self.reset()

    def reset(self) -> None:
        """Forget what is in flight: the tasks of every step not yet applied are handed out again."""
        self.in_flight: dict = {}  # rank -> (task, transport, deadline)
        self.arrived: dict = {}  # step -> {shard: (rank, gradient, metrics)}; backup workers: in arrival order
        self.next_task = (self.view.version(), 0)  # bounded staleness: the next (step, shard) to hand out
        self.given: dict = {}  # backup workers: rank -> the last step handed to it
        self._started, self._t0 = None, 0.0  # the step begun, and when

    # ------------------------------------------------------------------ the loop

    def run(self, first: int, count: int, out: list) -> None:
        """Apply updates first .. first+count-1 (the server's run_steps)."""
        view = self.view
        while view.version() < first + count:
            step = view.version()
            if self._started != step:
                view.begin(step)
                self._started, self._t0 = step, time.perf_counter()
            self._hand_out()
            ready = self._ready(step)
            if ready is None:
                self._wait()
                continue
            gradients, extra = ready
            view.conclude(step, gradients, self._t0, out, extra)
            self._applied(step, extra)

    def _hand_out(self) -> None:
        version, n = self.view.version(), len(self.view.carriers())
        free = [rank for rank in range(n) if rank not in self.in_flight]
        if self.backups:
            for rank in free:
                if self.given.get(rank) != version:
                    self._assign(rank, {"step": version, "shard": rank, "of": n})
                    self.given[rank] = version
            return
        for rank in free:
            step, shard = self.next_task
            if step >= self.view.total_steps or step > version + self.tau:
                return
            self._assign(rank, {"step": step, "shard": shard, "of": n})
            self.next_task = (step, shard + 1) if shard + 1 < n else (step + 1, 0)

    def _assign(self, rank: int, task: dict) -> None:
        carrier = self.view.carriers()[rank]
        carrier.assign(rank, task)
        self.in_flight[rank] = (task, carrier, time.monotonic() + self.view.step_timeout)

    def _wait(self) -> None:
        """Take the next finished task(s); WorkerLost for a worker that died or missed its deadline."""
        if not self.in_flight:
            raise RuntimeError(f"relaxed step {self.view.version()}: nothing in flight and the step incomplete")
        carriers = list({id(c): c for _, c, _ in self.in_flight.values()}.values())
        first_deadline = min(d for _, _, d in self.in_flight.values())
        timeout = min(max(first_deadline - time.monotonic(), 0.0), 1.0)
        if len(carriers) > 1:  # several transports: short turns at each
            timeout = min(timeout, 0.002)
        arrivals = [a for c in carriers for a in c.poll(timeout)]
        for rank, gradient in arrivals:
            self._accept(rank, gradient)
        now = time.monotonic()
        late = sorted(r for r, (_, _, d) in self.in_flight.items() if d <= now)
        if late:  # hung (a backup worker's lateness is no excuse past the step timeout)
            task, carrier, _ = self.in_flight[late[0]]
            raise carrier.hung(late[:1], task["step"])

    def _accept(self, rank: int, gradient) -> None:
        task, carrier, _ = self.in_flight.pop(rank)
        self.view.progressed()
        step = task["step"]
        if step < self.view.version():  # a backup worker's late gradient: its step is applied already
            return
        if carrier.reuses_buffers and not self.backups:  # the worker's next task overwrites it
            gradient = dataclasses.replace(gradient, parts=[self._keep(p) for p in gradient.parts])
        self.arrived.setdefault(step, {})[task["shard"]] = (rank, gradient)

    def _keep(self, grad) -> np.ndarray:
        buf = self._pool.pop() if self._pool else np.empty_like(grad)
        np.copyto(buf, grad)
        return buf

    def _ready(self, step: int):
        """(gradients, extra record fields) of `step` once it can be applied, else None."""
        got = self.arrived.get(step, {})
        n = len(self.view.carriers())
        if not self.backups:
            if len(got) < n:
                return None
            shards = [got[j] for j in range(n)]
            versions = [[rank, j, g.metrics["version"]] for j, (rank, g) in enumerate(shards)]
            return [g for _, g in shards], {"versions": versions}
        planned = self.plan.get(step)
        if planned is not None and planned["of"] == n:  # a replay: the ranks the run counted then
            if not all(r in got for r in planned["counted"]):
                return None
            counted = sorted(planned["counted"])
        else:
            if len(got) < max(n - self.backups, 1):
                return None
            counted = sorted(list(got)[:max(n - self.backups, 1)])  # the first to arrive
        dropped = [r for r in range(n) if r not in counted]
        return [got[r][1] for r in counted], {"counted": counted, "dropped": dropped}

    def _applied(self, step: int, extra: dict) -> None:
        got = self.arrived.pop(step, {})
        if self.backups:
            if step not in self.plan:  # write the decision down (a resume replays it)
                self.plan[step] = {"step": step, "counted": extra["counted"], "of": len(self.view.carriers())}
                self._write_decision(self.plan[step])
            return
        for _, gradient in got.values():  # the copies _keep made go back to the pool
            for part in gradient.parts:
                if isinstance(part, np.ndarray) and part.flags.writeable and part.flags.owndata:
                    self._pool.append(part)

    # ------------------------------------------------------------------ the server's other calls

    def settle(self) -> None:
        """Let every task in flight finish (their gradients kept), so no worker is busy and the
        parameters stay as they are: before an evaluation."""
        while self.in_flight:
            self._wait()

    def checkpoint(self) -> dict:
        """What a checkpoint records of the loop: the mode, and what was in flight or arrived but
        not applied (a resume computes those tasks again)."""
        version = self.view.version()  # (a backup worker's late task of an applied step is not needed)
        pending = [[t["step"], t["shard"], rank] for rank, (t, _, _) in sorted(self.in_flight.items())
                   if t["step"] >= version]
        pending += [[step, shard, rank] for step, got in sorted(self.arrived.items()) if step >= version
                    for shard, (rank, _) in sorted(got.items())]
        return {"staleness": None if math.isinf(self.tau) else self.tau, "backup_workers": self.backups,
                "version": version, "not_applied": pending}

    def restored(self, folder: str) -> None:
        """The server restored a checkpoint from `folder`: resume from its step, with the run's
        recorded decisions."""
        self.reset()
        path = os.path.join(folder, DECISIONS)
        if self.backups and os.path.exists(path):
            self.plan = read_decisions(path)

    def _write_decision(self, decision: dict) -> None:
        folder = self.view.checkpoints
        if folder is None:
            return
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, DECISIONS), "a") as f:
            f.write(json.dumps(decision) + "\n")


def read_decisions(path: str) -> dict:
    """step -> decision, from a decisions.jsonl (a torn last line, from a killed server, is ignored)."""
    plan = {}
    with open(path) as f:
        for line in f:
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                break
            plan[int(d["step"])] = d
    return plan
