"""Transports: how a step's request, parameters and gradients travel between the server and workers.

The parameter server talks to its workers only through a `Transport`, one per kind,
each carrying some of the workers (by rank). Per step the server calls `send(step)`
on every transport, then `receive(step, deadline)`: every worker computes at once,
and each transport hands back, for the ranks it carries, the worker's gradient of
its loss sum and its metrics: a flat array the server only reads, or, with sharded
servers (--servers K), the references to its K slices, which the shards fetch. Whatever
the transport, a worker that dies, hangs past the deadline or whose result is lost
comes out as `WorkerLost(rank, step, cause)`, and a worker whose code fails as
`WorkerError`.

- `ObjectStoreTransport` (object_store.py): Ray calls; the parameters go out as one
  object put per step, each gradient comes back as the call's result. Works across
  nodes and for GPU workers.
- `SharedMemoryTransport` (shared_memory.py): CPU workers on the server's node read
  the parameters from, and write their gradients into, shared-memory segments
  (shm.py); the step's request and the metrics go over a Unix socket (control.py).
  No copies through Ray, tens of microseconds of messaging per step.
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
import time

from ..errors import WorkerLost

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
    """The server's end of one way of moving steps; `host` is the ParameterServer (its flat
    parameters, its config's step_timeout, its run key)."""

    name = ""
    progress = False  # whether the server should call params_final during its update

    def __init__(self, host):
        self.host = host
        self.workers: dict = {}  # rank -> actor handle, the workers this transport carries

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
        """rank -> (gradient, metrics) of `step` for every worker carried (the gradient: a flat
        array, or with sharded servers the ObjectRefs of its K slices); WorkerLost for the
        first that died, or did not answer by `deadline` (time.monotonic()), which is killed:
        a hung worker must not come back stale."""

    @abc.abstractmethod
    def evaluate(self, rank: int, split: str, deadline: float) -> dict:
        """Worker `rank`'s evaluation of the current parameters on `split`."""

    def params_final(self, upto: int) -> None:
        """During the server's update: parameters [0, upto) hold their new values."""

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
        """[(rank, gradient, metrics)] of the tasks finished, waiting up to `timeout` s for one;
        the metrics say the parameter version computed on. WorkerLost for a worker that died."""
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
        return kill_hung(self.workers, ranks, step, f"{what} within {self.host.cfg.step_timeout:g} s")

    def evaluate_by_call(self, rank: int, split: str, deadline: float) -> dict:
        """Worker `rank`'s evaluation of the current parameters, sent as a Ray call's argument."""
        import ray
        ref = self.workers[rank].evaluate.remote(ray.put(self.host.flat.data), split)
        return self.call_all({rank: ref}, self.host.step, timeout=seconds_left(deadline))[rank]

    def call_all(self, refs: dict, step: int, timeout: float | None = None) -> dict:
        """rank -> result of the Ray calls `refs` (rank -> ObjectRef); WorkerLost for a worker that
        died, lost its result or missed the timeout (step_timeout by default)."""
        return call_all(self.workers, refs, step, self.host.cfg.step_timeout if timeout is None else timeout)


def call_all(workers: dict, refs: dict, step: int, timeout: float) -> dict:
    """rank -> result of the Ray calls `refs` (rank -> ObjectRef) to `workers` (rank -> actor);
    WorkerLost for the first that died or lost its result, or for one that missed the timeout
    (killed: a hung worker must not come back stale)."""
    import ray

    from ..errors import lost_cause
    ranks, waiting = list(refs), list(refs.values())
    _, pending = ray.wait(waiting, num_returns=len(waiting), timeout=max(timeout, 0.0))
    if pending:
        raise kill_hung(workers, [ranks[waiting.index(r)] for r in pending], step, f"no answer within {timeout:g} s")
    out = {}
    for rank, ref in refs.items():
        try:
            out[rank] = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
            raise WorkerLost(rank, step, lost_cause(e)) from None
    return out


def kill_hung(workers: dict, ranks: list, step: int, what: str) -> WorkerLost:
    """Kill the workers `ranks` that missed a deadline (a hung worker must not come back stale);
    the error naming the first."""
    import ray
    for rank in ranks:
        ray.kill(workers[rank])
    return WorkerLost(ranks[0], step, f"{what} (hung?)")


def seconds_left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


def transports(host) -> dict:
    """One transport of each kind for `host`, by name."""
    from .compiled_graph import CompiledGraphTransport
    from .object_store import ObjectStoreTransport
    from .shared_memory import SharedMemoryTransport
    return {OBJECT_STORE: ObjectStoreTransport(host), SHARED_MEMORY: SharedMemoryTransport(host),
            COMPILED_GRAPH: CompiledGraphTransport(host)}
