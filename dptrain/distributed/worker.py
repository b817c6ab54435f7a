"""The worker actor: one model replica computing the gradient of its shard of every step.

A plain class (Ray makes it remote where it is spawned, so its logic is tested
without Ray). Its step is the contract's part 2 (step.py): the gradient of the loss
sum over `sampler.shard_at(step, num_workers, rank)`. There is one way in,
`compute(request, *parameters)` (a `Request`, messages.py: which step, which shard,
which parameter version, which ranges), and the transports adapt to it: the object
store passes the parameters as arguments and takes the payload back as the call's
result; shared memory (`use_shared_memory` + `serve`, transport/shared_memory.py)
loads them from a segment and lets the payload be written into another. What leaves
is the codec's payload (compress.py: the gradient itself, or --compress's bytes).
"""

from __future__ import annotations

import time

import numpy as np

from .. import backend, compress
from ..config import TrainConfig, parse_straggler
from ..data import BatchSampler, Dataset
from ..data.mapped import is_mapped
from ..models import ModelFactory, layout
from ..step import Replica
from .errors import WorkerError
from .processes import identity
from .messages import Evaluate, Request, SegmentSpec


class Worker:
    """Worker `rank` of `num_workers`. The dataset arrives once, at construction, from Ray's
    object store: on the worker's node its arrays are read-only views of shared memory, not
    copies. `factory` builds the model (models.ModelFactory) and `loss` is the loss function;
    both arrive pickled by value where they come from a user's file."""

    def __init__(self, config: dict, factory: ModelFactory, loss, dataset: Dataset, rank: int, num_workers: int):
        self.cfg = TrainConfig.from_dict(config)
        self.rank, self.num_workers = rank, num_workers
        backend.retain_freed_memory()  # a step's arrays are allocated and freed again: keep them
        self.replica = Replica(self.cfg, dataset, factory, loss)
        self.sampler = BatchSampler(len(dataset), self.cfg.batch_size, self.cfg.seed)
        self.link = None  # our end of the shared-memory transport, while we use it
        self._busy = (None, 0.0)  # (step, time.monotonic() it started) while computing
        self._slowdown = straggler(self.cfg)  # an experiment's injected straggler (--straggler), else None
        flat = self.replica.flat
        self.codec = compress.codec(self.cfg.compress, flat.size, flat.data.dtype)
        if self.codec.max_bytes > flat.size * flat.data.dtype.itemsize:
            raise ValueError(f"--compress {self.cfg.compress}: a payload of {self.codec.max_bytes} bytes is larger "
                             f"than this model's {flat.size}-entry gradient")
        self._range_codecs = (None, [])  # --servers: (ranges, a codec per range), made once

    # ------------------------------------------------------------------ the step

    def compute(self, request: Request, *params, into: np.ndarray | None = None) -> tuple:
        """The gradient computation, the one way in. Loads `params` (none: loaded already, by the
        shared-memory link; one flat array; or with `request.ranges` one slice per range),
        backpropagates the loss SUM over the request's shard of its step's batch and returns
        ({"metrics": ..., "meta": [the codec's meta per part]}, *parts): the gradient's payload,
        one part per range (one without ranges), written into the byte buffer `into` if given.
        A failure of the code is a WorkerError naming this worker and the step."""
        if request.ranges is None:
            if params:
                self.replica.load_parameters(params[0])
        else:
            for (lo, hi), values in zip(request.ranges, params):
                self.replica.load_parameters(values, lo, hi)
        try:
            metrics = self._gradient(request)
        except Exception as e:
            raise WorkerError(f"worker {self.rank} failed at step {request.step}: {type(e).__name__}: {e}") from e
        grad = backend.to_numpy(self.replica.flat.grad)
        if request.ranges is None:
            encoded = [self.codec.encode(grad, into)]
        else:
            encoded = [c.encode(grad[lo:hi]) for c, (lo, hi) in zip(self._codecs_for(request.ranges), request.ranges)]
        parts = [part for part, _ in encoded]
        metrics["sent_bytes"] = sum(part.nbytes for part in parts)
        return ({"metrics": metrics, "meta": [meta for _, meta in encoded]}, *parts)

    def _gradient(self, request: Request) -> dict:
        """Leave the gradient of the request's loss sum in `replica.flat.grad`; the metrics the
        server combines, with when the computation started and ended (wall clock: the step's
        timeline)."""
        step = request.step
        start, t0 = time.time(), time.perf_counter()
        self._busy = (step, time.monotonic())
        shard, of = (self.rank, self.num_workers) if request.shard is None else (request.shard, request.of)
        indices, first_position = self.sampler.shard_at(step, of, shard)
        loss_sum, correct, count = self.replica.compute_gradients(indices, step, first_position)
        grad = self.replica.flat.grad
        # one reduction: NaN and Inf propagate through a sum (the server refuses such a step)
        finite = bool(np.isfinite(loss_sum) and np.isfinite(float(grad.sum())))
        if self._slowdown is not None:
            self._slowdown(step, self.rank, self.num_workers, time.perf_counter() - t0)
        self._busy = (None, 0.0)
        metrics = {"rank": self.rank, "step": step, "shard": shard, "loss_sum": loss_sum, "correct": correct,
                   "count": count, "finite": finite, "compute_s": time.perf_counter() - t0, "start": start,
                   "end": time.time()}
        if request.version is not None:
            metrics["version"] = request.version
        return metrics

    def _codecs_for(self, ranges: tuple) -> list:
        """A codec per range (sharded servers: top-k picks the largest RATIO of each range and
        keeps each range's residual), made once for the run's ranges."""
        if self._range_codecs[0] != ranges:
            self._range_codecs = (ranges, self.codec.ranges(list(ranges)))
        return self._range_codecs[1]

    def set_rank(self, rank: int, num_workers: int) -> None:
        """Take shard `rank` of `num_workers` from now on (the server says so whenever its
        workers change: after a lost one's share went to the others, say)."""
        self.rank, self.num_workers = rank, num_workers

    def evaluate(self, request: Evaluate, params: np.ndarray | None = None) -> dict:
        """Our part of an evaluation (`request`) of the flat parameters `params` (None: those loaded):
        {"batches": [loss sum, correct, count] of each of its batches, "classification": ...}."""
        if params is not None:
            self.replica.load_parameters(params)
        return {"batches": self.replica.evaluate(request.split, request.part, request.of, request.final),
                "classification": self.replica.task == "classification"}

    # ------------------------------------------------------------------ how the parameters arrive

    def use_object_store(self) -> None:
        """From now on the parameters arrive as call arguments: drop any shared-memory link."""
        self.close()

    def use_shared_memory(self, spec: SegmentSpec) -> str:
        """Map the server's parameter segment and make our gradient segment; returns the gradient
        segment's name for the server to map."""
        from .transport.shared_memory import WorkerLink
        self.close()  # a new server: drop the segments of the old one
        self.link = WorkerLink(self, spec)
        return self.link.grad.name

    def serve(self, address: str, secret: str) -> int:
        """Take the server's requests over its control channel until it lets us go (see
        transport/shared_memory.py); how many were served. `secret` goes in the hello."""
        return self.link.serve(address, secret)

    # ------------------------------------------------------------------ housekeeping

    def close(self) -> None:
        """Release shared-memory segments (the trainer calls this before killing the actor)."""
        if self.link is not None:
            self.link.close()
            self.link = None

    def ready(self) -> dict:
        """Where this worker runs: its rank, device and process (processes.identity; the driver
        waits on it, with a timeout, before step 0)."""
        return {"rank": self.rank, "device": self.cfg.device, **identity()}

    def status(self) -> dict:
        """The step being computed and for how long (a compiled graph computes in a thread of
        its own, so this answers meanwhile and tells a hung worker from a slow one)."""
        step, since = self._busy
        return {"step": step, "busy_s": time.monotonic() - since if step is not None else 0.0}

    def layout(self) -> list:
        """[name, shape, dtype] of every parameter of this replica (the driver checks they match the server's)."""
        return layout(self.replica.model)

    def memory(self) -> dict:
        """This process's memory: rss counts shared pages (the object store's), uss only its own."""
        import psutil
        info = psutil.Process().memory_full_info()
        return {"rss": info.rss, "uss": info.uss, "dataset_bytes": 0 if is_mapped(self.replica.x_train) else int(self.replica.x_train.nbytes)}




def straggler(cfg: TrainConfig):
    """The --straggler experiment's hook, or None: a function (step, rank, num_workers, seconds)
    that sleeps so that the slow rank's step takes FACTOR times its compute time. The random
    mode draws the slow rank from (seed, step): the same in a replayed step."""
    if not cfg.straggler:
        return None
    who, factor = parse_straggler(cfg.straggler)

    def slow_down(step: int, rank: int, num_workers: int, seconds: float) -> None:
        slow = int(np.random.default_rng([cfg.seed, step, 0x5106]).integers(num_workers)) if who == "random" else who
        if slow == rank and factor > 1:
            time.sleep((factor - 1) * seconds)
    return slow_down
