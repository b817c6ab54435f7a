"""The small values that cross the distributed layer's seams, and the views collaborators get.

- `Request`: what a worker is asked to compute (worker.py's one entry point); `Evaluate`,
  its part of an evaluation.
- `Gradient`: one worker's answer as the server's update consumes it (every transport's
  `receive` and `poll` hand these out).
- `SegmentSpec`: the shared-memory segments a worker maps (transport/shared_memory.py).
- `ServerView`: what a transport or a step loop may see of its server, a few values and
  calls, instead of the server object: renaming the server's insides breaks none of them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np


@dataclasses.dataclass(frozen=True)
class Request:
    """The gradient of the loss sum over shard `shard` of `of` of step `step`'s batch (None: the
    worker's own, by its rank). `version`: the parameter version it is computed on, echoed in
    the metrics (relaxed steps). `ranges`: with sharded servers, the [(lo, hi)] ranges the
    parameters arrive in and the gradient leaves in (None: one flat array each way)."""

    step: int
    shard: Optional[int] = None
    of: Optional[int] = None
    version: Optional[int] = None
    ranges: Optional[tuple] = None

    @classmethod
    def task(cls, task: dict, version: int | None = None) -> "Request":
        """A relaxed step's task (relaxed.py: step, shard, of)."""
        return cls(int(task["step"]), int(task["shard"]), int(task["of"]), version)

    def to_dict(self) -> dict:
        """The request as the control channel carries it (JSON; None fields left out). Written out:
        dataclasses.asdict deep-copies, tens of microseconds on every step."""
        out = {"step": self.step}
        for key in ("shard", "of", "version", "ranges"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_dict(cls, message: dict) -> "Request":
        """The request in a control-channel message (other keys, like "op", are ignored)."""
        ranges = message.get("ranges")
        return cls(int(message["step"]), message.get("shard"), message.get("of"), message.get("version"),
                   None if ranges is None else tuple(tuple(r) for r in ranges))


@dataclasses.dataclass(frozen=True)
class Evaluate:
    """Part `part` of `of` of an evaluation of `split` ("train" or "test"): a contiguous run of the
    evaluation's batches (step.evaluation_plan; `final`: the run's final figures), answered with
    each batch's sums."""

    split: str
    part: int = 0
    of: int = 1
    final: bool = False

    def to_dict(self) -> dict:
        return {"split": self.split, "part": self.part, "of": self.of, "final": self.final}


@dataclasses.dataclass
class Gradient:
    """One worker's answer: `parts` holds its payload for each of the update's ranges (one for
    the server's own update; K for sharded servers, as references to objects on the worker's
    node, which the shards fetch themselves), `meta` the codec's meta of each part (None: dense),
    and `metrics` its numbers (step.step_metrics combines them). `segment`: the name of the
    shared-memory segment that holds parts[0] (a worker on the server's node), where another
    process of that node may read it (server shards: shards.py)."""

    parts: list
    meta: list
    metrics: dict
    segment: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class SegmentSpec:
    """The server's shared-memory segments a worker maps: the parameters (`params`, `size`
    entries of `dtype`), the [sequence, version] header, and the tag its own gradient
    segment's name starts with."""

    params: str
    header: str
    size: int
    dtype: str
    tag: str


@dataclasses.dataclass(frozen=True)
class ServerView:
    """What the server's collaborators (transports, step loops) may use of it.

    Values: the run's key (its segments' names), the step timeout, the run's steps, the
    flat buffer's size and dtype, the folder of checkpoints (None: none kept). Calls:
    `version()` the updates applied (the step); `parameters()` the current flat parameters
    in host memory; `outgoing()` what the workers load each step, (ranges, parts): (None,
    [the flat array]) for the server's own update, the shards' ranges and references
    otherwise; `place(storage, name)` keeps the flat parameters in `storage`, the
    shared-memory segment `name`, from now on; `carriers()` rank -> the transport carrying that worker;
    `progressed()` tells the heartbeat the step loop got somewhere; `begin(step)`,
    `gather(step)` and `conclude(...)` are the server's parts of a step (loops.py)."""

    run_key: str
    step_timeout: float
    total_steps: int
    size: int
    dtype: np.dtype
    checkpoints: Optional[str]
    version: Callable[[], int]
    parameters: Callable[[], np.ndarray]
    outgoing: Callable[[], tuple]
    place: Callable[[np.ndarray, str], None]
    carriers: Callable[[], list]
    progressed: Callable[[], None]
    begin: Callable[[int], None]
    gather: Callable[[int], list]
    conclude: Callable[..., None]
