"""Sharded parameter servers (--servers K): K actors, each owning a contiguous range of the flat buffer.

With K > 1 the parameter server (server.py) keeps the step loop, the requests to
its workers, evaluation and checkpoints, but not the update: server shard j holds
parameters [lo_j, hi_j) and the optimizer's state over them. Per step every worker
fetches each shard's newest slice from the object store and returns its gradient as
K slices, one per shard (`Worker.compute_sharded`); shard j fetches the N slices of
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
newest checkpoint (recovery.py).
"""

from __future__ import annotations

import numpy as np

from .. import compress
from ..config import TrainConfig
from ..loop import build_optimizer
from ..nn.flat import ALIGN_BYTES
from ..nn.module import Parameter
from ..step import mean_gradient
from .errors import ShardLost
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
        self.cfg = TrainConfig.from_dict(config).replace(device="cpu", gpus_per_worker=0.0)
        self.index = index
        self.optimizer = None
        self.decoder = self.dense = None  # --compress: the range's payloads are decoded into `dense`
        self.lo = self.hi = 0
        self.step = 0

    def ready(self) -> str:
        """The node this shard runs on (any answer means it has started)."""
        return node_id()

    def load(self, step: int, lo: int, params: np.ndarray, state: dict) -> tuple[int, np.ndarray]:
        """Hold parameters [lo, lo + len(params)) at `step` with the optimizer state `state`
        (sliced alike); returns (step, them): two objects, called with num_returns=2, so that the
        server learns the step and leaves the parameters where they are for the workers."""
        if self.optimizer is None or self.optimizer.flat.size != params.size:
            self.optimizer = build_optimizer(self.cfg, [Parameter(np.zeros(params.size, params.dtype))])
        flat = self.optimizer.flat
        if flat.size != params.size:  # bounds() cuts at alignment boundaries: a range is its own flat buffer
            raise ValueError(f"shard {self.index}: a range of {params.size} entries is not aligned")
        flat.data[...] = params
        self.optimizer.load_state_dict(state)
        self.decoder = compress.make(self.cfg.compress, params.size, params.dtype)
        self.dense = np.zeros_like(params) if self.decoder is not None else None
        self.lo, self.hi, self.step = lo, lo + params.size, step
        return self.step, flat.data

    def update(self, step: int, count: int, lr: float, metas: list | None,
               *grads: np.ndarray) -> tuple[int, np.ndarray]:
        """Step `step` on this range: the workers' gradient slices (rank order; Ray fetched them
        from the workers' nodes) added, divided by `count`, fed to the optimizer block by block
        at rate `lr`. With --compress the slices are payloads (`metas`: theirs, rank order),
        decoded and added first. Returns (the new step, the range's new parameters), like `load`."""
        if step != self.step:
            raise RuntimeError(f"server shard {self.index} at step {self.step} was sent gradients for step {step}")
        if metas is not None:
            grads = [compress.decode_sum(self.decoder, grads, metas, self.dense)]
        flat = self.optimizer.flat
        self.optimizer.lr = lr
        grad = flat.grad
        self.optimizer.update(flat.data, grad, lambda start, stop: mean_gradient(grads, count, grad, start, stop))
        self.step += 1
        return self.step, flat.data

    def state(self) -> dict:
        """The range's step, parameters and optimizer state (for a checkpoint)."""
        return {"step": self.step, "lo": self.lo, "params": self.optimizer.flat.data,
                "optimizer": self.optimizer.state_dict()}

    def close(self) -> None:
        """Nothing to release (the fleet calls close on every actor before killing it)."""


class Shards:
    """The parameter server's end of its K shards: which range each owns, the references to
    their newest slices, and the calls that update, gather and restore them. `host` is the
    ParameterServer; its flat parameters and optimizer hold the run's state only where
    `host_is_current` (at the start and after a restore): otherwise the shards do."""

    def __init__(self, host):
        self.host = host
        flat = host.flat
        self.bounds = bounds(flat.size, host.cfg.servers, flat.data.dtype.itemsize)
        self.actors: list = []
        self.refs: list = []  # shard j's newest parameter slice: an object in its node's store
        self.host_is_current = True

    def attach(self, actors: list) -> None:
        """Use these shard actors (index order) from now on: new ones, or the host's state
        restored, get the host's ranges of parameters and optimizer state."""
        if actors == self.actors and not self.host_is_current:
            return  # the shards hold the newest state: nothing to send
        if not self.host_is_current:
            raise RuntimeError("server shards replaced without a restored state to give them (a restore comes first)")
        host = self.host
        state = host.optimizer.state_dict()
        self.actors = list(actors)
        self._settle([a.load.options(num_returns=2).remote(host.step, lo, host.flat.data[lo:hi],
                                                           sliced_state(state, lo, hi))
                      for a, (lo, hi) in zip(self.actors, self.bounds)], host.step)

    def restored(self) -> None:
        """The host's parameters and optimizer state are the run's again (a checkpoint, or the
        initial ones): `attach` sends them to the shards."""
        self.host_is_current = True

    def update(self, step: int, grads: list, count: int, lr: float, metas: list | None = None) -> None:
        """Every shard's update of `step`; grads: each worker's K gradient slices (references, rank
        order); metas: with --compress, each worker's K payload metas."""
        self.host_is_current = False
        self._settle([a.update.options(num_returns=2).remote(step, count, lr,
                                                             None if metas is None else [m[j] for m in metas],
                                                             *[g[j] for g in grads])
                      for j, a in enumerate(self.actors)], step + 1)

    def _settle(self, calls: list, step: int) -> None:
        """Wait for every shard's (step, parameters) call and keep the parameters' references:
        only the small step comes here (on a cluster the ranges stay on the shards' nodes
        until the workers fetch them)."""
        held = self.wait([s for s, _ in calls], step)
        for j, at in enumerate(held):
            if at != step:
                raise ShardLost(j, step, f"it holds step {at}")
        self.refs = [params for _, params in calls]

    def gather(self, optimizer: bool = False) -> None:
        """Copy the shards' newest parameters (and with `optimizer` their optimizer state) into the
        host's flat buffer: before an evaluation, a checkpoint, the final parameters."""
        host = self.host
        if self.host_is_current:
            return
        step = host.step
        if not optimizer:
            for (lo, hi), values in zip(self.bounds, self.wait(self.refs, step)):
                host.flat.data[lo:hi] = values
            return
        states = self.wait([a.state.remote() for a in self.actors], step)
        state = host.optimizer.state_dict()
        for j, ((lo, hi), st) in enumerate(zip(self.bounds, states)):
            if st["step"] != step:
                raise ShardLost(j, step, f"it holds step {st['step']}")
            host.flat.data[lo:hi] = st["params"]
            for name, a in state["state"].items():
                a[lo:hi] = st["optimizer"]["state"][name]
        state["steps"], state["lr"] = states[0]["optimizer"]["steps"], states[0]["optimizer"]["lr"]
        host.optimizer.load_state_dict(state)

    def wait(self, refs: list, step: int) -> list:
        """The results of one call per shard (index order); ShardLost for the first that died, failed
        to fetch a worker's gradient (its node died) or missed step_timeout (it is killed: a hung
        shard must not come back stale)."""
        import ray
        timeout = self.host.cfg.step_timeout
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if pending:
            hung = [refs.index(r) for r in pending]
            for j in hung:
                ray.kill(self.actors[j])
            raise ShardLost(hung[0], step, f"no answer within {timeout:g} s (hung?)")
        out = []
        for j, ref in enumerate(refs):
            try:
                out.append(ray.get(ref))
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as e:
                raise ShardLost(j, step, f"{type(e).__name__}") from None
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)):
                    raise ShardLost(j, step, f"{type(e.cause).__name__}") from None
                raise
        return out
