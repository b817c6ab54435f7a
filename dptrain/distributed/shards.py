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

On one node (every shard and worker a CPU process on the server's node, dense gradients,
--transport auto) the object store is left out: the workers stay on shared memory, shard
j's range is a view of the server's parameter segment, it reads its range of the workers'
gradient segments in place, and a step's update is one small message each way per shard
over a control channel (transport/control.py). `ShardedUpdate` chooses the way from the
placement.

The update is elementwise (the mean gradient and every optimizer's rule), so any
split into ranges gives exactly the one server's numbers. The shards move in
lockstep (the server waits for all K before the next step), so the state gathered for
a checkpoint is one step's. A lost shard leaves the ranges at possibly different
steps: `ShardLost`, a new shard in its place, and every shard restored from the
newest checkpoint (recovery.py). `ShardedUpdate` is the parameter server's end: its
update seam (update.py) for this placement.
"""

from __future__ import annotations

import time

import numpy as np

from .. import backend, compress
from ..config import TrainConfig
from ..blocks import build_optimizer
from ..nn.flat import ALIGN_BYTES, flatten
from ..nn.module import Parameter
from ..step import apply_mean_gradient, clip_scale, mean_and_squares, scaled_update
from .errors import ShardLost, get_all
from .transport import control
from .transport.shm import SharedArray
from .update import Update, placed
from .processes import identity


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
    parameter server (`load`): at the start, after a restore, and when it replaces a lost one.
    Where the run is on one node, `load_shared` instead: its range is then a view of the run's
    shared parameter segment, it reads the workers' gradients in their segments, and its steps
    are asked over a control channel (`serve`) instead of Ray calls."""

    def __init__(self, config: dict, index: int):
        # its optimizer's per-entry options (weight decay by parameter) arrive with the state (`load`)
        self.cfg = TrainConfig.from_dict(config).replace(device="cpu", gpus_per_worker=0.0, decay_params="all")
        self.index = index
        self.optimizer = self.param = None
        backend.retain_freed_memory()
        self.codec = None  # the range's payloads become the addends of its mean gradient
        self.lo = self.hi = 0
        self.step = 0
        self.segment: SharedArray | None = None  # the run's shared parameters (one node), when used
        self.grads: dict = {}  # segment name -> a worker's gradient segment, mapped (one node)

    def ready(self) -> dict:
        """This shard's process and node (processes.identity; any answer means it has started)."""
        return identity()

    def load(self, step: int, lo: int, params: np.ndarray, state: dict) -> tuple[tuple, np.ndarray]:
        """Hold parameters [lo, lo + len(params)) at `step` with the optimizer state `state`
        (sliced alike); returns ((step, 0.0), them): two objects, called with num_returns=2, so that
        the server learns the step and leaves the parameters where they are for the workers."""
        self._unmap()
        flat = self._range(step, lo, params.size, params.dtype, state).flat
        flat.data[...] = params
        return (self.step, 0.0), flat.data

    def load_shared(self, step: int, lo: int, hi: int, segment: str, size: int, dtype: str, state: dict) -> int:
        """Hold parameters [lo, hi) at `step`, in place in the run's shared-memory segment `segment`
        (`size` entries of `dtype`, on this node; it holds them already), with the optimizer state
        `state` (sliced alike); the workers' gradients come from their segments (`serve`). The step."""
        self._unmap()
        self.segment = SharedArray.attach(segment, size, dtype)
        optimizer = self._range(step, lo, hi - lo, np.dtype(dtype), state)
        optimizer.flat = flatten([self.param], data=self.segment.array[lo:hi], grad=optimizer.flat.grad,
                                 data_is_current=True)
        return self.step

    def _range(self, step: int, lo: int, n: int, dtype, state: dict):
        """The optimizer over parameters [lo, lo + n), at `step` with `state`."""
        self.param = Parameter(np.zeros(n, dtype))
        self.optimizer = build_optimizer(self.cfg, [self.param])
        if self.optimizer.flat.size != n:  # bounds() cuts at alignment boundaries: a range is its own flat buffer
            raise ValueError(f"shard {self.index}: a range of {n} entries is not aligned")
        self.optimizer.load_state_dict(state)
        self.codec = compress.codec(self.cfg.compress, n, dtype)
        self.lo, self.hi, self.step = lo, lo + n, step
        return self.optimizer

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

    def serve(self, address: str, secret: str) -> int:
        """Take the parameter server's updates over a control channel (transport/control.py), until it
        says stop or goes away: on one node, with `load_shared`, a step's whole exchange is a few
        bytes each way. How many were served."""
        return control.serve(address, self.index, secret, self.answer)

    def answer(self, request: dict) -> dict:
        """One request of `serve`: "update", "mean" or "scaled" (the methods above), the workers'
        gradients read in place from the segments `request["grads"]` names (rank order)."""
        op, step = request.get("op"), int(request["step"])
        if op == "scaled":
            (at, _), _ = self.scaled(step, float(request["lr"]), float(request["scale"]))
            return {"step": at}
        grads = self._gradients(request["grads"])
        metas = [None] * len(grads)
        if op == "update":
            (at, squares), _ = self.update(step, int(request["count"]), float(request["lr"]), metas, *grads)
            return {"step": at, "squares": squares}
        if op == "mean":
            return {"squares": self.mean(step, int(request["count"]), metas, *grads)}
        return {"error": f"server shard {self.index}: unknown request {op!r}"}

    def _gradients(self, names: list) -> list:
        """This range of each named worker's gradient segment (mapped once; unnamed ones dropped)."""
        if self.segment is None:
            raise RuntimeError(f"server shard {self.index} holds no shared parameters (load_shared first)")
        for name in [n for n in self.grads if n not in names]:
            self.grads.pop(name).close()
        for name in names:
            if name not in self.grads:
                self.grads[name] = SharedArray.attach(name, self.segment.array.size, self.segment.array.dtype)
        return [self.grads[name].array[self.lo:self.hi] for name in names]

    def _unmap(self) -> None:
        if self.segment is not None:  # the optimizer's parameters are views of it: they go first
            self.optimizer = self.param = None
        for seg in [self.segment, *self.grads.values()]:
            if seg is not None:
                seg.close()
        self.segment, self.grads = None, {}

    def close(self) -> None:
        """Drop the shared segments' mappings (the fleet calls close on every actor before killing it)."""
        self._unmap()


class ShardedUpdate(Update):
    """The parameter server's end of its K shards (update.py's seam): which range each owns, where
    they hold it, and the calls that update, gather and restore them. `optimizer` is the
    server's, over `model`'s parameters: the run's state where the server holds it (the start, a
    restore, a gather); the shards hold the newest otherwise, and `parameters` and `state` fetch
    it from them when the server's copy is older.

    Two ways to reach the shards, chosen from where everything runs (`transport_setting`):
    - over the object store (any placement): workers fetch each shard's newest slice, return K
      slices, and each step is a Ray call per shard with megabyte arguments and result;
    - on one node (every shard and every worker a CPU worker on the server's node, dense
      gradients, transport auto): the server's flat parameters are the shared-memory segment its
      workers read in place (transport/shared_memory.py), each shard's range a view of it
      (`ServerShard.load_shared`), and each shard reads its range of the workers' gradient
      segments in place. A step is then one small message each way per shard over a control
      channel: nothing is copied, and the update runs in K processes, off this one's lock.
    The shards are loaded lazily, in the way in use, before the first step that needs them."""

    def __init__(self, model, optimizer, codec, k: int, step_timeout: float, max_norm: float | None = None):
        self.model, self.optimizer, self.flat = model, optimizer, optimizer.flat
        self.step_timeout, self.max_norm = step_timeout, max_norm
        self.shareable = codec.writes_in_place  # dense: a shard may read the gradients in place
        self.ranges = tuple(bounds(self.flat.size, k, self.flat.data.dtype.itemsize))
        self.initial = (self.flat.data.copy(), optimizer.state_dict())  # a lost shard without a checkpoint
        self.actors: list = []
        self.nodes: list = []  # the node each shard runs on
        self.refs: list = []  # over the object store: shard j's newest parameter slice, in its node's store
        self.local = False  # on one node, over the shared segment `segment` (the class's docstring)
        self.segment: str | None = None
        self.sessions = control.Sessions("shards", step_timeout, ShardLost, _failed)
        self.step = 0  # the step the shards hold
        self._params_current = self._state_current = True  # what the server's copy holds of the newest
        self._unsent = True  # the shards must be loaded from the server's copy

    def transport_setting(self, setting, placement, here):
        """On one node (the class's docstring) the workers may use shared memory (`setting`, auto);
        anywhere else every worker reaches the shards through the object store."""
        local = bool(self.shareable and setting == "auto" and self.nodes and all(n == here for n in self.nodes)
                     and all(p["node_id"] == here and p["device"] == "cpu" for p in placement))
        if local != self.local:  # the newest state to the server's copy, then loaded the other way
            self.state()
            self._unsent, self.local = True, local
        return setting if local else "object_store"

    def attach(self, actors):
        """Use these shard actors (index order) from now on: new ones, or the server's state
        restored, get their ranges of parameters and optimizer state (before the next step)."""
        if actors == self.actors and not self._unsent:
            return  # the shards hold the newest state: nothing to send
        if not self._unsent:
            raise RuntimeError("server shards replaced without a restored state to give them (a restore comes first)")
        self.sessions.close()
        self.actors = list(actors)
        self.nodes = [p["node_id"] for p in self.wait([a.ready.remote() for a in self.actors], self.step)]

    def place(self, storage, name):
        """The server's flat parameters (the model's) live in the shared segment `name` from now on."""
        self.parameters()
        self.flat, self.segment = placed(self.model, self.optimizer, storage), name
        self._unsent = True  # the shards map the new segment

    def restore(self, state):
        """The server's copy is the run's state again (a checkpoint, or None: the initial one):
        the shards get it before the next step."""
        params, optimizer_state, step = (*self.initial, 0) if state is None else state
        self.sessions.close()
        self.flat.data[...] = params
        self.optimizer.load_state_dict(optimizer_state)
        self.step = step
        self._params_current = self._state_current = self._unsent = True

    def _load(self) -> None:
        """Give every shard its range of the server's copy, in the way in use."""
        if not self.actors:
            raise RuntimeError("sharded update before the shards were attached")
        self.sessions.close()
        state, step = self.optimizer.state_dict(), self.step
        if self.local:
            if self.segment is None:
                raise RuntimeError("the shards share the workers' node, but the parameters are in no shared segment")
            size, dtype = self.flat.size, str(self.flat.data.dtype)
            held = self.wait([a.load_shared.remote(step, lo, hi, self.segment, size, dtype, sliced_state(state, lo, hi))
                              for a, (lo, hi) in zip(self.actors, self.ranges)], step)
            self._check_steps(held, step)
            self.refs = []
        else:
            self._settle([a.load.options(num_returns=2).remote(step, lo, self.flat.data[lo:hi],
                                                               sliced_state(state, lo, hi))
                          for a, (lo, hi) in zip(self.actors, self.ranges)], step)
        self._unsent = False

    def apply(self, step, gradients, count, lr, transports):
        """Every shard's update of `step` (each gradient's parts: its K slices, references; on one
        node, the segments they lie in). With --clip-grad-norm in two calls: the shards' mean
        gradients and their sums of squares, then, the global norm known, the scaled updates."""
        if self._unsent:
            self._load()
        self._state_current = False
        self._params_current = self.local  # on one node the server's copy is the shards' parameters
        if self.local:
            squares = self._apply_local(step, [g.segment for g in gradients], count, lr)
        else:
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

    def _apply_local(self, step: int, segments: list, count: int, lr: float) -> list:
        """`apply` on one node: each request names the workers' gradient segments (rank order)."""
        if None in segments:
            raise RuntimeError("the shards share the workers' node, but a gradient is in no shared segment")
        self.sessions.open(dict(enumerate(self.actors)), lambda a, address, secret: a.serve.remote(address, secret),
                           step)
        if self.max_norm is None:
            replies = self._ask({"op": "update", "step": step, "count": count, "lr": lr, "grads": segments}, step)
            squares = [r["squares"] for r in replies]
        else:
            squares = [r["squares"] for r in self._ask({"op": "mean", "step": step, "count": count,
                                                        "grads": segments}, step)]
            scale = clip_scale(sum(squares) ** 0.5, self.max_norm)
            replies = self._ask({"op": "scaled", "step": step, "lr": lr, "scale": scale}, step)
        self._check_steps([r["step"] for r in replies], step + 1)
        return squares

    def _ask(self, message: dict, step: int) -> list:
        """Every shard's answer to `message` (index order): all are asked before any is heard."""
        for j in range(len(self.actors)):
            self.sessions.send(j, message, step)
        deadline = time.monotonic() + self.step_timeout
        replies = [self.sessions.reply(j, step, deadline) for j in range(len(self.actors))]
        for j, reply in enumerate(replies):
            if "error" in reply:
                raise RuntimeError(f"server shard {j}: {reply['error']}")
        return replies

    def outgoing(self):
        if self._unsent:
            self._load()
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
            self.sessions.close()
            states = self.wait([a.state.remote() for a in self.actors], step)
            state = self.optimizer.state_dict()
            for j, ((lo, hi), st) in enumerate(zip(self.ranges, states)):
                if st["step"] != step:
                    raise ShardLost(j, step, f"it holds step {st['step']}")
                if not self.local:  # (on one node the server's copy is the shards' parameters)
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
        self.sessions.close()
        self.wait([a.ready.remote() for a in self.actors], step)  # a dead shard: ShardLost
        for j, ref in enumerate(self.refs):
            try:
                ray.get(ref, timeout=self.step_timeout)
            except ray.exceptions.ObjectLostError as e:
                raise ShardLost(j, step, f"its newest parameters were lost with its node ({type(e).__name__})") from None
            except ray.exceptions.GetTimeoutError:
                raise ShardLost(j, step, f"its newest parameters could not be fetched within {self.step_timeout:g} s") from None

    def close(self):
        self.sessions.close()

    def _settle(self, calls: list, step: int) -> list:
        """Wait for every shard's ((step, squares), parameters) call and keep the parameters'
        references: only the small status comes here (on a cluster the ranges stay on the shards'
        nodes until the workers fetch them). The shards' sums of squares, in shard order."""
        held = self.wait([s for s, _ in calls], step)
        self._check_steps([at for at, _ in held], step)
        self.refs = [params for _, params in calls]
        return [squares for _, squares in held]

    @staticmethod
    def _check_steps(steps: list, step: int) -> None:
        for j, at in enumerate(steps):
            if at != step:
                raise ShardLost(j, step, f"it holds step {at}")

    def wait(self, refs: list, step: int) -> list:
        """The results of one call per shard (index order); ShardLost for the first that died, failed
        to fetch a worker's gradient (its node died) or missed step_timeout (it is killed: a hung
        shard must not come back stale)."""
        results = get_all(dict(enumerate(refs)), lambda j, cause: ShardLost(j, step, cause), self.step_timeout,
                          dict(enumerate(self.actors)))
        return [results[j] for j in range(len(refs))]


def _failed(index: int, step: int, message: str) -> RuntimeError:
    return RuntimeError(f"server shard {index} failed at step {step}: {message}")
