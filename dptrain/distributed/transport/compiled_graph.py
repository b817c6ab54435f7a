"""Steps over a Ray Compiled Graph: Ray's own shared-memory channels between the server and workers.

The server compiles (`ray.dag`, `experimental_compile`) a graph whose input is (request,
flat parameters) and whose outputs are every worker's `compute(request, params)`: its
reply and its gradient's payload. Ray moves the values over channels it allocates
(shared memory on one node) and runs each worker's part in a loop of its own, with a
per-execution cost Ray documents in tens of microseconds. `--transport compiled_graph`
puts every worker on it.

Measured against the hand-written channel (docs/scaling.md, "Transports"), it is slower on
this 2-core machine: its actors and the reading server poll for their channels, and
every value is serialized into a channel and out again, where the hand-written channel
copies nothing through Ray. It is kept as the measured alternative and as a third
implementation of the boundary.

Failures: a worker that dies breaks the graph (Ray tears it down); the dead rank is found
by asking every worker for `ready` and reported as WorkerLost. A worker that misses the
step deadline is found by its own `status` (answered outside the graph's loop) and
killed. Recovery then connects a new set of workers, and a new graph is compiled.
Evaluations go outside the graph, as Ray calls (Transport.send_evaluation).
"""

from __future__ import annotations

import logging
import time

from ..errors import WorkerError, WorkerLost, is_timeout, lost_cause, unwrap
from ..messages import Gradient, Request, ServerView
from . import COMPILED_GRAPH, Transport, seconds_left

log = logging.getLogger(__name__)


class CompiledGraphTransport(Transport):
    name = COMPILED_GRAPH

    def __init__(self, view: ServerView):
        super().__init__(view)
        self._dag = None
        self._ref = None
        self._broken = False  # a worker of the graph died or was killed: compile a new one

    def connect(self, workers: dict, step: int) -> None:
        if self._dag is not None and not self._broken and workers == self.workers:
            return
        self._teardown()
        self.workers = dict(workers)
        if not workers:
            return
        self.call_all({rank: w.use_object_store.remote() for rank, w in workers.items()}, step,
                      timeout=max(self.view.step_timeout, 60.0))
        from ray.dag import InputNode, MultiOutputNode
        ranks = sorted(workers)
        with InputNode() as inp:  # execute(request, params)
            out = MultiOutputNode([workers[r].compute.bind(inp[0], inp[1]) for r in ranks])
        self._dag = out.experimental_compile(_submit_timeout=self.view.step_timeout)
        self._ranks = ranks

    def send(self, step: int) -> None:
        if self._dag is None:
            return
        self._ref = self._dag.execute(Request(step), self.view.parameters())

    def receive(self, step: int, deadline: float) -> dict:
        import ray
        if self._ref is None:
            return {}
        ref, self._ref = self._ref, None
        try:
            outputs = ray.get(ref, timeout=max(seconds_left(deadline), 0.001))
        except Exception as e:  # a dead worker breaks the graph's channels
            if isinstance(unwrap(e), WorkerError):
                raise unwrap(e) from None
            if is_timeout(e):
                raise self.hung([self._slowest(step)], step) from None
            raise self._lost(step, e) from None
        return {rank: Gradient(parts, reply["meta"], reply["metrics"])
                for rank, (reply, *parts) in zip(self._ranks, outputs)}

    def hung(self, ranks: list, step: int, what: str = "no answer") -> WorkerLost:
        self._broken = True  # the graph cannot go on without the killed worker
        return super().hung(ranks, step, what)

    def close(self) -> None:
        self._teardown()
        super().close()

    # ------------------------------------------------------------------ failures

    def _lost(self, step: int, error: BaseException) -> WorkerLost:
        """The worker whose death broke the graph (each is asked whether it answers)."""
        import ray
        self._broken = True
        for rank in self._ranks:
            try:
                ray.get(self.workers[rank].ready.remote(), timeout=5)
            except Exception as e:
                if is_timeout(e):
                    ray.kill(self.workers[rank])
                    return WorkerLost(rank, step, "no answer within 5 s after the graph broke")
                if lost_cause(e) is None:
                    raise
                return WorkerLost(rank, step, f"its process died ({type(error).__name__})")
        return WorkerLost(self._ranks[0], step, f"the compiled graph failed: {type(error).__name__}: {error}")

    def _slowest(self, step: int) -> int:
        """The rank busy longest with `step` (by the workers' own `status`), or the first that
        does not answer at all."""
        import ray
        busiest, longest = self._ranks[0], -1.0
        for rank in self._ranks:
            try:
                status = ray.get(self.workers[rank].status.remote(), timeout=5)
            except Exception:
                return rank
            if status["step"] == step and status["busy_s"] > longest:
                busiest, longest = rank, status["busy_s"]
        return busiest

    def _teardown(self) -> None:
        if self._dag is not None:
            t0 = time.monotonic()
            try:
                self._dag.teardown()
            except Exception as e:  # a graph whose worker died is torn down already
                log.debug("compiled graph teardown: %s", e)
            log.debug("compiled graph torn down in %.2f s", time.monotonic() - t0)
        self._dag = self._ref = None
        self._broken = False
