"""Transports: how a step's request, parameters and gradients travel between the server and workers.

The parameter server talks to its workers only through a `Transport`, one per kind,
each carrying some of the workers (by rank), and each seeing of the server only its
`ServerView` (messages.py). Per step the server calls `send(step)` on every transport,
then `receive(step, deadline)`: every worker computes at once, and each transport
hands back, for the ranks it carries, the worker's `Gradient` (messages.py): its
payload for each of the update's ranges and its metrics. A worker is asked through
its one entry point, `Worker.compute(Request, *parameters)`; the transports differ in
how the request, the parameters and the payload travel. Whatever the transport, a
worker that dies, hangs past the deadline or whose result is lost comes out as
`WorkerLost(rank, step, cause)`, and a worker whose code fails as `WorkerError`.

- `ObjectStoreTransport` (object_store.py): Ray calls; the parameters go out as one
  object put per step, each gradient comes back as the call's result. Works across
  nodes and for GPU workers.
- `SharedMemoryTransport` (shared_memory.py): CPU workers on the server's node read
  the parameters from, and write their gradients into, shared-memory segments
  (shm.py); the step's request and the metrics go over a Unix socket (control.py).
  Nothing passes through Ray's object store; tens of microseconds of messaging per step.
- `CompiledGraphTransport` (compiled_graph.py): a Ray Compiled Graph over all workers
  (`--transport compiled_graph`); measured slower here, kept as the alternative.

`assign` decides which transport carries which worker. Connecting is the
transports' business (`connect(workers)`: the set of workers it carries from now
on, new ones set up, gone ones released), so starting, replacing a worker, shrinking
and replacing the server are one path for the driver: it hands the server its
workers and where they run (ParameterServer.set_workers).
"""

from __future__ import annotations

import abc
import os
import time

from ..errors import WorkerLost, get_all, kill_hung
from ..messages import Evaluate, ServerView

OBJECT_STORE, SHARED_MEMORY, COMPILED_GRAPH = "object_store", "shared_memory", "compiled_graph"


def assign(setting: str, placement: list, server_node: str) -> dict:
    """Rank -> transport name. `setting` is TrainConfig.transport: "auto" puts CPU workers on
    the server's node on shared memory and the others on the object store; "object_store"
    and "compiled_graph" put every worker on that one."""
    if setting == COMPILED_GRAPH:
        return {rank: COMPILED_GRAPH for rank in range(len(placement))}

    def fits_shared(p):
        return setting == "auto" and p["node_id"] == server_node and p["device"] == "cpu"
    return {rank: SHARED_MEMORY if fits_shared(p) else OBJECT_STORE for rank, p in enumerate(placement)}


def workers_outlive_server(setting: str) -> bool:
    """Whether workers can serve a new server after theirs died. Not those of a compiled graph:
    Ray keeps them in the dead server's graph, so recovery replaces them too."""
    return setting != COMPILED_GRAPH


class Transport(abc.ABC):
    """The server's end of one way of moving steps, seeing the server through `view`."""

    name = ""

    def __init__(self, view: ServerView):
        self.view = view
        self.workers: dict = {}  # rank -> actor handle, the workers this transport carries
        self._evaluating: dict = {}  # rank -> ObjectRef of its part of the evaluation in flight

    @abc.abstractmethod
    def connect(self, workers: dict, step: int) -> None:
        """Carry exactly `workers` (rank -> actor) from now on: set up the new ones, release the
        ones no longer here (lost, or carried by another transport). WorkerLost if one of the
        new ones does not answer."""

    @abc.abstractmethod
    def send(self, step: int) -> None:
        """Ask every worker carried for its gradient of `step` (on the current parameters)."""

    @abc.abstractmethod
    def receive(self, step: int, deadline: float) -> dict:
        """rank -> Gradient of `step` for every worker carried; WorkerLost for the first that died,
        or did not answer by `deadline` (time.monotonic()), which is killed: a hung worker must
        not come back stale."""

    def send_evaluation(self, split: str, of: int, final: bool = False) -> None:
        """Ask every worker carried for its part (its rank, of `of`) of an evaluation of the current
        parameters on `split` (`final`: the run's final figure; over Ray calls, which a transport
        with a channel of its own replaces)."""
        if not self.workers:
            return
        params = shared_argument(self.view.parameters())
        self._evaluating = {rank: w.evaluate.remote(Evaluate(split, rank, of, final), params)
                            for rank, w in self.workers.items()}

    def receive_evaluation(self, deadline: float) -> dict:
        """rank -> the answer to `send_evaluation` of every worker carried; WorkerLost as `receive`."""
        refs, self._evaluating = self._evaluating, {}
        return self.call_all(refs, self.view.version(), timeout=seconds_left(deadline)) if refs else {}

    def updating(self, begins: bool, version: int) -> None:
        """The server's update begins (the parameters are version `version`), or has ended (they
        are now version `version`)."""

    # ------------------------------------------------------------------ relaxed steps (relaxed.py)

    reuses_buffers = False  # whether a gradient handed out by poll is overwritten by the worker's next task

    def assign(self, rank: int, task: dict) -> None:
        """Hand worker `rank` a task (relaxed.py): the gradient of shard task["shard"] of
        task["of"] of step task["step"]'s batch, on the newest parameters."""
        raise NotImplementedError(f"the {self.name} transport runs only the synchronous step")

    def poll(self, timeout: float) -> list:
        """[(rank, Gradient)] of the tasks finished, waiting up to `timeout` s for one; the
        metrics say the parameter version computed on. WorkerLost for a worker that died."""
        raise NotImplementedError(f"the {self.name} transport runs only the synchronous step")

    def pause(self) -> None:
        """Let the workers take other Ray calls (the server is about to change its setup)."""

    def close(self) -> None:
        """Release everything this transport holds (the run is over)."""
        self.pause()
        self.workers = {}

    # ------------------------------------------------------------------ shared by the transports

    def hung(self, ranks: list, step: int, what: str = "no answer") -> WorkerLost:
        """Kill workers that missed the deadline; the error naming the first."""
        return kill_hung(self.workers, ranks, _lost(step), f"{what} within {self.view.step_timeout:g} s")

    def call_all(self, refs: dict, step: int, timeout: float | None = None) -> dict:
        """rank -> result of the Ray calls `refs` (rank -> ObjectRef); WorkerLost for a worker that
        died, lost its result or missed the timeout (step_timeout by default)."""
        return call_all(self.workers, refs, step, self.view.step_timeout if timeout is None else timeout)


def call_all(workers: dict, refs: dict, step: int, timeout: float) -> dict:
    """rank -> result of the Ray calls `refs` (rank -> ObjectRef) to `workers` (rank -> actor);
    WorkerLost for the first that died or lost its result, or for one that missed the timeout
    (killed: a hung worker must not come back stale)."""
    return get_all(refs, _lost(step), timeout, workers)


def _lost(step: int):
    return lambda rank, cause: WorkerLost(rank, step, cause)


# Ray sends a call's argument of at most this many bytes inside the call itself, and puts a larger
# one in its object store (Ray's own setting, RAY_max_direct_call_object_size, 100 KiB by default).
INLINE_BYTES = int(os.environ.get("RAY_max_direct_call_object_size", 100 * 1024))


def shared_argument(array):
    """`array` as the argument of several Ray calls: put in the object store once for all of
    them, or, as small as Ray sends inside a call, the array itself. For a small model the put
    costs more than the step: with 2 workers on 2 cores, a call's round trip to each with a
    put array of 50 floats took 4.3-4.7 ms, with the array itself 2.0-2.1 ms (empty calls
    1.3-2.3 ms)."""
    import ray
    return array if array.nbytes <= INLINE_BYTES else ray.put(array)


def seconds_left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


def transports(view: ServerView) -> dict:
    """One transport of each kind for the server `view`, by name."""
    from .compiled_graph import CompiledGraphTransport
    from .object_store import ObjectStoreTransport
    from .shared_memory import SharedMemoryTransport
    return {OBJECT_STORE: ObjectStoreTransport(view), SHARED_MEMORY: SharedMemoryTransport(view),
            COMPILED_GRAPH: CompiledGraphTransport(view)}
