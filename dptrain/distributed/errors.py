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


def lost_cause(error: BaseException) -> str:
    """Why a worker counts as lost, from Ray's error: its process died (RayActorError), or its
    result lived in the object store of a node that died (ObjectLostError, e.g.
    ObjectReconstructionFailedError)."""
    import ray
    if isinstance(error, ray.exceptions.ObjectLostError):
        return f"its result was lost with its node ({type(error).__name__})"
    return f"its process died ({type(error).__name__})"
