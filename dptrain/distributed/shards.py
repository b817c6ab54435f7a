"""Sharded parameter servers (--servers K): K actors, each owning a contiguous range of the flat buffer.

With K > 1 the parameter server (server.py) keeps the step loop, the requests to
its workers, evaluation and checkpoints, but not the update: server shard j holds
parameters [lo_j, hi_j) and the optimizer's state over them. Per step every worker
fetches each shard's newest slice from the object store and returns its gradient as
K slices, one per shard (a `Request` with the shards' ranges); shard j fetches the N slices of
its range straight from the workers' nodes, adds them in rank order, divides once by
the batch's example count and applies the optimizer to its range (step.py's parts 3
and 4); its new slice stays in its node's object store for the workers' next fetch.
The parameter server passes object references only: the bytes go worker -> shard ->
worker, 2 x N x G / K through each shard's link for a gradient of G bytes.

The update is elementwise (the mean gradient and every optimizer's rule), so any
split into ranges gives exactly the one server's numbers. The shards move in
lockstep (the server waits for all K before the next step), so the state gathered for
a checkpoint is one step's. A lost shard leaves the ranges at possibly different
steps: `ShardLost`, a new shard in its place, and every shard restored from the
newest checkpoint (recovery.py). `ShardedUpdate` is the parameter server's end: its
update seam (update.py) for this placement.
"""

from __future__ import annotations

import numpy as np

from .. import backend, compress
from ..config import TrainConfig
from ..blocks import build_optimizer
from ..nn.flat import ALIGN_BYTES
from ..nn.module import Parameter
from ..step import apply_mean_gradient, clip_scale, mean_and_squares, scaled_update
from .errors import ShardLost, get_all
from .update import Update
from .worker import node_id


def bounds(size: int, k: int, itemsize: int) -> list:
    """K contiguous ranges [(lo, hi)] covering a flat buffer of `size` entries, balanced by bytes
    (one dtype: by entries), each starting on an ALIGN_BYTES boundary like the buffer's
    parameters. A buffer too small for K aligned ranges gives some empty ones at the end."""
    step = max(1, ALIGN_BYTES // itemsize)
    cuts = [min(size, round(size * j / k / step) * step) for j in range(k)] + [size]
    return [(cuts[j], cuts[j + 1]) for j in range(k)]


def sliced_state(state: dict, lo: int, hi: int) -> dict:
    """An optimizer's state_dict restricted to entries [lo, hi) of its arrays."""
    return dict(state, state={name: a[lo:hi] for name, a in state["state"].items()})


class ServerShard:
    """One shard: parameters [lo, hi) of the flat buffer and the optimizer over them. A plain
    class (Ray makes it remote where it is spawned). It learns its range and state from the
    parameter server (`load`): at the start, after a restore, and when it replaces a lost one."""

    def __init__(self, config: dict, index: int):
        # its optimizer's per-entry options (weight decay by parameter) arrive with the state (`load`)
        self.cfg = TrainConfig.from_dict(config).replace(device="cpu", gpus_per_worker=0.0, decay_params="all")
        self.index = index
        self.optimizer = None
        backend.retain_freed_memory()
        self.codec = None  # the range's payloads become the addends of its mean gradient
        self.lo = self.hi = 0
        self.step = 0

    def ready(self) -> str:
        """The node this shard runs on (any answer means it has started)."""
        return node_id()

    def load(self, step: int, lo: int, params: np.ndarray, state: dict) -> tuple[tuple, np.ndarray]:
        """Hold parameters [lo, lo + len(params)) at `step` with the optimizer state `state`
        (sliced alike); returns ((step, 0.0), them): two objects, called with num_returns=2, so that
        the server learns the step and leaves the parameters where they are for the workers."""
        if self.optimizer is None or self.optimizer.flat.size != params.size:
            self.optimizer = build_optimizer(self.cfg, [Parameter(np.zeros(params.size, params.dtype))])
        flat = self.optimizer.flat
        if flat.size != params.size:  # bounds() cuts at alignment boundaries: a range is its own flat buffer
            raise ValueError(f"shard {self.index}: a range of {params.size} entries is not aligned")
        flat.data[...] = params
        self.optimizer.load_state_dict(state)
        self.codec = compress.codec(self.cfg.compress, params.size, params.dtype)
        self.lo, self.hi, self.step = lo, lo + params.size, step
        return (self.step, 0.0), flat.data

    def starting(self, step: int) -> None:
        """Called as each step's work on this range begins (faults.py injects shard faults here)."""
        if step != self.step:
            raise RuntimeError(f"server shard {self.index} at step {self.step} was sent gradients for step {step}")

    def update(self, step: int, count: int, lr: float, metas: list, *grads: np.ndarray) -> tuple[tuple, np.ndarray]:
        """Step `step` on this range: the workers' payloads of it (rank order; Ray fetched them from
        the workers' nodes; `metas`: their codec metas) become the codec's addends, which are added,
        divided by `count` and fed to the optimizer block by block at rate `lr`. Returns ((the new
        step, the sum of the squares of the range's mean gradient), the range's new parameters)."""
        self.starting(step)
        squares = apply_mean_gradient(self.optimizer, self.codec.addends(grads, metas), count, lr)
        self.step += 1
        return (self.step, squares), self.optimizer.flat.data

    def mean(self, step: int, count: int, metas: list, *grads: np.ndarray) -> float:
        """--clip-grad-norm's first half of step `step`: the range's mean gradient, kept for `scaled`;
        the sum of its squares (the server adds the K shards' in shard order for the global norm)."""
        self.starting(step)
        return mean_and_squares(self.codec.addends(grads, metas), count, self.optimizer.flat.grad)

    def scaled(self, step: int, lr: float, scale: float) -> tuple[tuple, np.ndarray]:
        """Its second half: the mean gradient scaled by `scale`, the optimizer's update; like `update`."""
        if step != self.step:
            raise RuntimeError(f"server shard {self.index} at step {self.step} was asked to finish step {step}")
        scaled_update(self.optimizer, lr, scale)
        self.step += 1
        return (self.step, 0.0), self.optimizer.flat.data

    def state(self) -> dict:
        """The range's step, parameters and optimizer state (for a checkpoint)."""
        return {"step": self.step, "lo": self.lo, "params": self.optimizer.flat.data,
                "optimizer": self.optimizer.state_dict()}

    def close(self) -> None:
        """Nothing to release (the fleet calls close on every actor before killing it)."""


class ShardedUpdate(Update):
    """The parameter server's end of its K shards (update.py's seam): which range each owns, the
    references to their newest slices, and the calls that update, gather and restore them.
    `optimizer` is the server's, over the whole flat buffer: the run's state where the server
    holds it (the start, a restore, a gather); the shards hold the newest otherwise, and
    `parameters` and `state` fetch it from them when the server's copy is older."""

    def __init__(self, optimizer, k: int, step_timeout: float, max_norm: float | None = None):
        self.optimizer, self.flat = optimizer, optimizer.flat
        self.step_timeout, self.max_norm = step_timeout, max_norm
        self.ranges = tuple(bounds(self.flat.size, k, self.flat.data.dtype.itemsize))
        self.initial = (self.flat.data.copy(), optimizer.state_dict())  # a lost shard without a checkpoint
        self.actors: list = []
        self.refs: list = []  # shard j's newest parameter slice: an object in its node's store
        self.step = 0  # the step the shards hold
        self._params_current = self._state_current = True  # what the server's copy holds of the newest
        self._unsent = True  # the shards must be loaded from the server's copy (attach)

    def transport_setting(self, setting):
        return "object_store"  # every worker reaches the shards through the object store (any node)

    def attach(self, actors):
        """Use these shard actors (index order) from now on: new ones, or the server's state
        restored, get their ranges of parameters and optimizer state."""
        if actors == self.actors and not self._unsent:
            return  # the shards hold the newest state: nothing to send
        if not self._unsent:
            raise RuntimeError("server shards replaced without a restored state to give them (a restore comes first)")
        state = self.optimizer.state_dict()
        self.actors = list(actors)
        self._settle([a.load.options(num_returns=2).remote(self.step, lo, self.flat.data[lo:hi],
                                                           sliced_state(state, lo, hi))
                      for a, (lo, hi) in zip(self.actors, self.ranges)], self.step)
        self._unsent = False

    def restore(self, state):
        """The server's copy is the run's state again (a checkpoint, or None: the initial one):
        `attach` sends it to the shards."""
        params, optimizer_state, step = (*self.initial, 0) if state is None else state
        self.flat.data[...] = params
        self.optimizer.load_state_dict(optimizer_state)
        self.step = step
        self._params_current = self._state_current = self._unsent = True

    def apply(self, step, gradients, count, lr, transports):
        """Every shard's update of `step` (each gradient's parts: its K slices, references). With
        --clip-grad-norm in two calls: the shards' mean gradients and their sums of squares, then,
        the global norm known, the scaled updates."""
        if self._unsent:
            raise RuntimeError("sharded update before the shards were given their state (attach)")
        self._params_current = self._state_current = False

        def each(j):  # shard j's slices of every worker's payload, rank order, and their metas
            return [g.meta[j] for g in gradients], *[g.parts[j] for g in gradients]
        if self.max_norm is None:
            squares = self._settle([a.update.options(num_returns=2).remote(step, count, lr, *each(j))
                                    for j, a in enumerate(self.actors)], step + 1)
        else:
            squares = self.wait([a.mean.remote(step, count, *each(j)) for j, a in enumerate(self.actors)], step)
            scale = clip_scale(sum(squares) ** 0.5, self.max_norm)
            self._settle([a.scaled.options(num_returns=2).remote(step, lr, scale) for a in self.actors], step + 1)
        self.step = step + 1
        return sum(squares) ** 0.5

    def outgoing(self):
        return self.ranges, list(self.refs)

    def parameters(self):
        if not self._params_current:
            for (lo, hi), values in zip(self.ranges, self.wait(self.refs, self.step)):
                self.flat.data[lo:hi] = values
            self._params_current = True
        return self.flat.data

    def state(self):
        if not self._state_current:
            step = self.step
            states = self.wait([a.state.remote() for a in self.actors], step)
            state = self.optimizer.state_dict()
            for j, ((lo, hi), st) in enumerate(zip(self.ranges, states)):
                if st["step"] != step:
                    raise ShardLost(j, step, f"it holds step {st['step']}")
                self.flat.data[lo:hi] = st["params"]
                for name, a in state["state"].items():
                    a[lo:hi] = st["optimizer"]["state"][name]
            state["steps"], state["lr"] = states[0]["optimizer"]["steps"], states[0]["optimizer"]["lr"]
            self.optimizer.load_state_dict(state)  # copies it in: `state` stays ours to hand out
            self._params_current = self._state_current = True
            return self.flat.data, state
        return self.flat.data, self.optimizer.state_dict()

    def check_outgoing(self, step):
        """A worker lost at `step` may have died with a shard's node, or have been unable to fetch a
        slice that died with it (Ray cannot rebuild an actor's result): ShardLost for the first shard
        that is dead or whose newest slice is gone, so that it is replaced and every shard restored
        (replacing only the worker would send it the same lost slice again)."""
        import ray
        self.wait([a.ready.remote() for a in self.actors], step)  # a dead shard: ShardLost
        for j, ref in enumerate(self.refs):
            try:
                ray.get(ref, timeout=self.step_timeout)
            except ray.exceptions.ObjectLostError as e:
                raise ShardLost(j, step, f"its newest parameters were lost with its node ({type(e).__name__})") from None
            except ray.exceptions.GetTimeoutError:
                raise ShardLost(j, step, f"its newest parameters could not be fetched within {self.step_timeout:g} s") from None

    def _settle(self, calls: list, step: int) -> list:
        """Wait for every shard's ((step, squares), parameters) call and keep the parameters'
        references: only the small status comes here (on a cluster the ranges stay on the shards'
        nodes until the workers fetch them). The shards' sums of squares, in shard order."""
        held = self.wait([s for s, _ in calls], step)
        for j, (at, _) in enumerate(held):
            if at != step:
                raise ShardLost(j, step, f"it holds step {at}")
        self.refs = [params for _, params in calls]
        return [squares for _, squares in held]

    def wait(self, refs: list, step: int) -> list:
        """The results of one call per shard (index order); ShardLost for the first that died, failed
        to fetch a worker's gradient (its node died) or missed step_timeout (it is killed: a hung
        shard must not come back stale)."""
        results = get_all(dict(enumerate(refs)), lambda j, cause: ShardLost(j, step, cause), self.step_timeout,
                          dict(enumerate(self.actors)))
        return [results[j] for j in range(len(refs))]
