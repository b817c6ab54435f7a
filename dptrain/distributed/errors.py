"""The distributed layer's failure vocabulary: what went wrong, where and at which step.

Recoverable: `WorkerLost` (a worker died, hung, or its result was lost with its node;
every transport reports it the same way), `ServerLost` and, with sharded servers,
`ShardLost`. Not recoverable: a worker's code failed (`WorkerError`), a NaN or Inf under `on_nonfinite=stop` (`NonFiniteError`);
the driver turns them, and a spent failure budget, into `TrainingError`.
"""

from __future__ import annotations


class WorkerError(RuntimeError):
    """A worker's code failed (an exception, not a death); the message names the worker and the step."""


class WorkerLost(RuntimeError):
    """Worker `rank` died, hung or lost its result at `step`; `cause` says which. The server's
    state is that of before the step: the step can be run again."""

    def __init__(self, rank: int, step: int, cause: str):
        super().__init__(f"worker {rank} lost at step {step}: {cause}")
        self.rank, self.step, self.cause = rank, step, cause

    def __reduce__(self):  # crosses process boundaries inside Ray's task errors
        return (WorkerLost, (self.rank, self.step, self.cause))


class ServerLost(RuntimeError):
    """The parameter-server actor died or hung; a new one restarts from the newest checkpoint."""

    def __init__(self, step: int, cause: str):
        super().__init__(f"parameter server lost around step {step}: {cause}")
        self.step, self.cause = step, cause


class ShardLost(ServerLost):
    """Server shard `index` (--servers K) died, hung or could not finish `step`'s update. The
    shards' ranges may now hold different steps: a new shard takes its place and every shard
    is restored from the newest checkpoint (the parameter server itself lives on)."""

    def __init__(self, index: int, step: int, cause: str):
        RuntimeError.__init__(self, f"server shard {index} lost at step {step}: {cause}")
        self.index, self.step, self.cause = index, step, cause

    def __reduce__(self):  # crosses process boundaries inside Ray's task errors
        return (ShardLost, (self.index, self.step, self.cause))


class NonFiniteError(RuntimeError):
    """A NaN or Inf loss or gradient; the message names the step and the worker(s)."""


class TrainingError(RuntimeError):
    """Training stopped: a worker or the server failed. The message names which and at what step."""


# ---------------------------------------------------------------------- Ray's errors, translated
# The one place that reads Ray's exception types: everything else asks these.

def unwrap(error: BaseException) -> BaseException:
    """The original exception inside Ray's wrappers (a task error inside a dependency's error)."""
    import ray
    seen = 0
    while isinstance(error, ray.exceptions.RayTaskError) and getattr(error, "cause", None) is not None and seen < 10:
        error, seen = error.cause, seen + 1
    return error


def lost_cause(error: BaseException) -> str | None:
    """Why an actor counts as lost, from Ray's error (also wrapped in a task error): its process
    died (RayActorError), or a result lived in the object store of a node that died
    (ObjectLostError, e.g. ObjectReconstructionFailedError). None: the error is not a loss."""
    import ray
    error = unwrap(error)
    if isinstance(error, ray.exceptions.ObjectLostError):
        return f"its result was lost with its node ({type(error).__name__})"
    if isinstance(error, ray.exceptions.RayActorError):
        return f"its process died ({type(error).__name__})"
    return None


def is_timeout(error: BaseException) -> bool:
    """Whether a Ray wait ran out of time."""
    import ray
    return isinstance(error, (ray.exceptions.GetTimeoutError, TimeoutError))


def get_all(refs: dict, lost, timeout: float, actors: dict) -> dict:
    """key -> result of the Ray calls `refs` (key -> ObjectRef) to `actors` (key -> actor handle).
    An actor that missed `timeout` is killed (a hung actor must not come back stale); one that
    died or lost its result, or was hung, raises `lost(key, cause)`, for the first such key."""
    import ray
    keys, waiting = list(refs), list(refs.values())
    _, pending = ray.wait(waiting, num_returns=len(waiting), timeout=max(timeout, 0.0))
    if pending:
        raise kill_hung(actors, [keys[waiting.index(r)] for r in pending], lost, f"no answer within {timeout:.3g} s")
    out = {}
    for key, ref in refs.items():
        try:
            out[key] = ray.get(ref)
        except ray.exceptions.RayError as e:
            cause = lost_cause(e)
            if cause is None:
                raise
            raise lost(key, cause) from None
    return out


def kill_hung(actors: dict, keys: list, lost, what: str) -> BaseException:
    """Kill the actors `keys` that missed a deadline; `lost(first key, cause)` to raise."""
    import ray
    for key in keys:
        ray.kill(actors[key])
    return lost(keys[0], f"{what} (hung?)")
