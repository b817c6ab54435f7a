"""The worker actor: one model replica computing the gradient of its shard of every step.

A plain class (Ray makes it remote where it is spawned, so its logic is tested
without Ray). Its step is the contract's part 2 (step.py): the gradient of the loss
sum over `sampler.shard_at(step, num_workers, rank)`, left in the replica's flat
gradient buffer. How the parameters arrive and the gradient leaves is the
transport's: `compute_gradients(params, step)` over the object store,
`use_shared_memory` + `serve` over shared memory (transport/). A relaxed step's task
(relaxed.py) names any shard of any step; with --compress the worker sends a payload
(`outgoing`, compress.py) and keeps top-k's residual.
"""

from __future__ import annotations

import os
import time

import numpy as np

from .. import backend, compress
from ..config import TrainConfig, parse_straggler
from ..data import BatchSampler, Dataset
from ..models import ModelFactory, layout
from ..step import Replica
from .errors import WorkerError


class Worker:
    """Worker `rank` of `num_workers`. The dataset arrives once, at construction, from Ray's
    object store: on the worker's node its arrays are read-only views of shared memory, not
    copies. `factory` builds the model (models.ModelFactory) and `loss` is the loss function;
    both arrive pickled by value where they come from a user's file."""

    def __init__(self, config: dict, factory: ModelFactory, loss, dataset: Dataset, rank: int, num_workers: int):
        self.cfg = TrainConfig.from_dict(config)
        self.rank, self.num_workers = rank, num_workers
        self.replica = Replica(self.cfg, dataset, factory, loss)
        self.sampler = BatchSampler(len(dataset), self.cfg.batch_size, self.cfg.seed)
        self.link = None  # our end of the shared-memory transport, while we use it
        self._busy = (None, 0.0)  # (step, time.monotonic() it started) while computing
        self._straggler = parse_straggler(self.cfg.straggler) if self.cfg.straggler else None  # (rank, factor)
        flat = self.replica.flat
        self.compressor = compress.make(self.cfg.compress, flat.size, flat.data.dtype)  # None: dense gradients
        if self.compressor is not None and self.compressor.max_bytes > flat.size * flat.data.dtype.itemsize:
            raise ValueError(f"--compress {self.cfg.compress}: a payload of {self.compressor.max_bytes} bytes is larger "
                             f"than this model's {flat.size}-entry gradient")
        self._payload = np.empty(self.compressor.max_bytes, np.uint8) if self.compressor else None
        self._range_coders = (None, [])  # --servers with --compress: (bounds, [(compressor, buffer)] per range)

    # ------------------------------------------------------------------ the step

    def compute(self, step: int, shard: int | None = None, of: int | None = None) -> dict:
        """Backpropagate the loss SUM over shard `shard` of `of` of `step`'s batch (default: ours,
        by rank) on the parameters loaded; the gradient stays in `replica.flat.grad`. Returns
        the metrics the server combines, with when the computation started and ended (wall
        clock: the step's timeline)."""
        start, t0 = time.time(), time.perf_counter()
        self._busy = (step, time.monotonic())
        shard, of = (self.rank, self.num_workers) if shard is None else (shard, of)
        indices, first_position = self.sampler.shard_at(step, of, shard)
        loss_sum, correct, count = self.replica.compute_gradients(indices, step, first_position)
        grad = self.replica.flat.grad
        # one reduction: NaN and Inf propagate through a sum (the server refuses such a step)
        finite = bool(np.isfinite(loss_sum) and np.isfinite(float(grad.sum())))
        factor = self._slowdown(step)
        if factor > 1:  # an injected straggler (--straggler): FACTOR times this step's compute time
            time.sleep((factor - 1) * (time.perf_counter() - t0))
        self._busy = (None, 0.0)
        return {"rank": self.rank, "step": step, "shard": shard, "loss_sum": loss_sum, "correct": correct,
                "count": count, "finite": finite, "compute_s": time.perf_counter() - t0, "start": start,
                "end": time.time()}

    def _slowdown(self, step: int) -> float:
        """How many times slower than it is this worker is at `step` (--straggler; 1: not slowed).
        The random mode draws the slow rank from (seed, step): the same in a replayed step."""
        if self._straggler is None:
            return 1.0
        who, factor = self._straggler
        if who == "random":
            who = int(np.random.default_rng([self.cfg.seed, step, 0x5106]).integers(self.num_workers))
        return factor if who == self.rank else 1.0

    def run_step(self, step: int, shard: int | None = None, of: int | None = None) -> dict:
        """`compute`, with a failure of its code as WorkerError naming this worker and the step."""
        try:
            return self.compute(step, shard, of)
        except Exception as e:
            raise WorkerError(f"worker {self.rank} failed at step {step}: {type(e).__name__}: {e}") from e

    def set_rank(self, rank: int, num_workers: int) -> None:
        """Take shard `rank` of `num_workers` from now on (the server says so whenever its
        workers change: after a lost one's share went to the others, say)."""
        self.rank, self.num_workers = rank, num_workers

    # ------------------------------------------------------------------ over the object store

    def outgoing(self, metrics: dict, into: np.ndarray | None = None) -> np.ndarray:
        """What we send of the gradient just computed: the flat gradient as numpy, or with
        --compress its payload (written into the byte buffer `into` if given; the payload's
        meta goes into `metrics`). `metrics["sent_bytes"]` says how many bytes it is."""
        grad = backend.to_numpy(self.replica.flat.grad)
        if self.compressor is None:
            metrics["sent_bytes"] = grad.nbytes
            return grad
        buf = self._payload if into is None else into
        meta = self.compressor.encode(grad, buf)
        metrics["payload"], metrics["sent_bytes"] = meta, meta["bytes"]
        return buf[:meta["bytes"]]

    def compute_gradients(self, params: np.ndarray, step: int) -> tuple[np.ndarray, dict]:
        """Load the flat parameters `params`, compute `step`; (what we send of our gradient, metrics)."""
        self.replica.load_parameters(params)
        metrics = self.run_step(step)
        return self.outgoing(metrics), metrics

    def compute_sharded(self, step: int, bounds: list, *params: np.ndarray) -> tuple:
        """Sharded servers (shards.py): load each shard's slice `params[j]` into its range `bounds[j]`,
        compute `step`; (metrics, then our gradient's slice for each shard)."""
        for (lo, hi), values in zip(bounds, params):
            self.replica.load_parameters(values, lo, hi)
        metrics = self.run_step(step)
        if self.compressor is None:
            grad = self.outgoing(metrics)  # dense: the whole gradient's bytes, sent in K parts
            return (metrics, *(grad[lo:hi] for lo, hi in bounds))
        return (metrics, *self._outgoing_ranges(metrics, bounds))

    def _outgoing_ranges(self, metrics: dict, bounds: list) -> list:
        """--compress with sharded servers: each shard's range encoded on its own (top-k picks the
        largest RATIO of each range's entries and keeps each range's residual); the payloads'
        metas go into metrics["payload"] in shard order."""
        if self._range_coders[0] != bounds:  # made once: a payload buffer per range, like `_payload`
            dtype = self.replica.flat.data.dtype
            coders = [compress.make(self.cfg.compress, hi - lo, dtype) for lo, hi in bounds]
            self._range_coders = (bounds, [(c, np.empty(c.max_bytes, np.uint8)) for c in coders])
        grad = backend.to_numpy(self.replica.flat.grad)
        payloads, metas = [], []
        for (lo, hi), (coder, buf) in zip(bounds, self._range_coders[1]):
            metas.append(coder.encode(grad[lo:hi], buf))
            payloads.append(buf[:metas[-1]["bytes"]])
        metrics["payload"], metrics["sent_bytes"] = metas, sum(m["bytes"] for m in metas)
        return payloads

    def compute_task(self, params: np.ndarray, version: int, task: dict) -> tuple[np.ndarray, dict]:
        """A relaxed step's task (relaxed.py): shard task["shard"] of task["of"] of step
        task["step"], on `params`, parameter version `version`; (flat gradient, metrics with
        the version)."""
        self.replica.load_parameters(params)
        metrics = dict(self.run_step(task["step"], task["shard"], task["of"]), version=version)
        return self.outgoing(metrics), metrics

    def evaluate(self, params: np.ndarray, split: str = "test") -> dict:
        """Loss (and accuracy) of the flat parameters `params` on a split."""
        self.replica.load_parameters(params)
        return self.replica.evaluate(split)

    def use_object_store(self) -> None:
        """From now on the parameters arrive as call arguments: drop any shared-memory link."""
        self.close()

    # ------------------------------------------------------------------ over shared memory

    def use_shared_memory(self, spec: dict) -> str:
        """Map the server's parameter segment and make our gradient segment (spec: params, size,
        dtype, tag); returns the gradient segment's name for the server to map."""
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
        """Where this worker runs (the driver waits on it, with a timeout, before step 0)."""
        return {"rank": self.rank, "pid": os.getpid(), "node_id": node_id(), "device": self.cfg.device}

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
        return {"rss": info.rss, "uss": info.uss, "dataset_bytes": int(self.replica.x_train.nbytes)}


def node_id() -> str:
    """The Ray node this process runs on ("local" outside Ray: the actors are plain classes too)."""
    try:
        import ray
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return "local"
