"""The server's update seam: where a step's gradients meet the optimizer, and where the state lives.

An `Update` owns the run's flat parameters and optimizer state. The parameter server
(server.py) calls the same few methods whatever the placement:

- `apply(step, gradients, count, lr, transports)`: step `step`'s update from the
  workers' `Gradient`s (rank order): their mean gradient (step.py's parts 3 and 4) at
  rate `lr`;
- `parameters()`: the current flat parameters, in the server's memory (for an
  evaluation, the final result); `outgoing()`: what the workers load each step;
- `state()` / `restore(state)`: (parameters, optimizer state) for a checkpoint, and back
  with its step (None: the initial state);
- `attach(actors)`, `place(storage)`, `transport_setting(setting)`: what the placement
  needs of the fleet and the transports.

Two placements: `LocalUpdate` (here: the server applies the update itself, block by
block inside the optimizer's pass) and `ShardedUpdate` (shards.py, --servers K: K shard actors each update a
range). A new placement is one class with these methods and one line in `make`.
"""

from __future__ import annotations

import abc

import numpy as np

from ..compress import Codec
from ..nn import flatten
from ..step import apply_mean_gradient


class Update(abc.ABC):
    """The interface (see the module's docstring)."""

    ranges: tuple | None = None  # the [(lo, hi)] ranges gradients travel in (None: one flat array)

    @abc.abstractmethod
    def apply(self, step: int, gradients: list, count: int, lr: float, transports: list) -> float:
        """Step `step`'s update: the mean of the gradients' addends (the codec's, rank order) over
        `count` examples, clipped to the run's --clip-grad-norm, fed to the optimizer at rate `lr`;
        returns the mean gradient's global L2 norm before clipping. `transports` see it begin and
        end (`updating`)."""

    @abc.abstractmethod
    def parameters(self) -> np.ndarray:
        """The current flat parameters, in this process's memory."""

    def outgoing(self) -> tuple:
        """(ranges, parts) the workers load each step: (None, [the flat parameters])."""
        return None, [self.parameters()]

    @abc.abstractmethod
    def state(self) -> tuple[np.ndarray, dict]:
        """(flat parameters, optimizer state_dict), current, for a checkpoint."""

    @abc.abstractmethod
    def restore(self, state: tuple | None) -> None:
        """Hold (flat parameters, optimizer state_dict, step) from now on; None: the initial ones."""

    def use_threads(self, threads: int) -> None:
        """Update over this many threads (--update-threads auto); a sharded update's shards keep theirs."""

    def check_outgoing(self, step: int) -> None:
        """After a worker's loss at `step`: raise the loss of whatever held what the workers were
        sent, if it is lost too (a worker that could not fetch a shard's slice is not the one that
        died). Nothing here: the server holds it itself."""

    def attach(self, actors: list) -> None:
        """Use these server shard actors (only a sharded update has any)."""
        if actors:
            raise RuntimeError(f"{type(self).__name__} has no server shards to attach")

    def place(self, storage: np.ndarray, name: str) -> None:
        """Keep the flat parameters in `storage`, the shared-memory segment `name`, from now on."""
        raise RuntimeError(f"{type(self).__name__} cannot place its parameters elsewhere")

    def transport_setting(self, setting: str, placement: list, here: str) -> str:
        """The transport setting its workers may use (transport.assign), given the run's and where
        the workers run (`placement`, rank order; `here`: the server's node)."""
        return setting

    def close(self) -> None:
        """Release what it holds outside this process (the run is over)."""


class LocalUpdate(Update):
    """The server's own update of the whole flat buffer, with `optimizer` (over `model`'s
    parameters), the gradients' `codec` and the clipping norm `max_norm` (None: none)."""

    def __init__(self, model, optimizer, codec: Codec, max_norm: float | None = None):
        self.model, self.optimizer, self.codec, self.max_norm = model, optimizer, codec, max_norm
        self.flat = optimizer.flat

    def apply(self, step, gradients, count, lr, transports):
        addends = self.codec.addends([g.parts[0] for g in gradients], [g.meta[0] for g in gradients])
        for t in transports:
            t.updating(True, step)
        squares = apply_mean_gradient(self.optimizer, addends, count, lr, self.max_norm)
        for t in transports:
            t.updating(False, step + 1)
        return squares ** 0.5

    def parameters(self):
        return self.flat.data

    def use_threads(self, threads):
        self.optimizer.threads = threads

    def state(self):
        return self.flat.data, self.optimizer.state_dict()

    def restore(self, state):
        if state is None:
            if self.optimizer.steps:  # never asked of a used server (recovery restores into a new one)
                raise RuntimeError("the server's initial parameters were updated: there is no initial state to restore")
            return
        params, optimizer_state, _ = state
        self.flat.data[...] = params
        self.optimizer.load_state_dict(optimizer_state)

    def place(self, storage, name):
        self.flat = placed(self.model, self.optimizer, storage)


def placed(model, optimizer, storage: np.ndarray):
    """`model`'s parameters (the ones `optimizer` steps) moved, unchanged, into `storage`: their
    flat buffer from now on, the optimizer's too; returned."""
    optimizer.flat = flatten(model.parameters(), data=storage, grad=optimizer.flat.grad)
    return optimizer.flat


def make(cfg, model, optimizer, codec: Codec) -> Update:
    """The update of a run's config: --servers K > 1 shards it, else the server applies it."""
    if cfg.servers > 1:
        from .shards import ShardedUpdate
        return ShardedUpdate(model, optimizer, codec, cfg.servers, cfg.step_timeout, cfg.clip_grad_norm)
    return LocalUpdate(model, optimizer, codec, cfg.clip_grad_norm)
