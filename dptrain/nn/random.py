"""Randomness inside a forward pass (dropout) as a pure function of where it is used.

A dropout mask must be the same whether one process or N workers compute a step,
and the same again when a step is replayed after a fault. So the trainer does not
draw masks from a generator that advances: the number for element e of the example
at position i of step s's global batch, in the layer named L, is a hash of
(seed, s, i, L, e) -- a counter-based generator (splitmix64's finaliser, vectorised).
Whatever shard holds example i draws the same numbers for it.

`context(seed, step, positions)` says which (seed, step, positions) the forward pass
inside it is for; the trainer's replicas set it around every training forward.
Outside any context (a user's own loop) layers draw from `init.default_generator()`.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_current = None  # (seed, step, positions) of the forward pass being computed


class context:
    """Forward passes inside draw their randomness from (seed, step, each example's position).

    A class, not a generator: every training forward enters one, and most draw nothing (a
    model without dropout), so entering costs two assignments and the positions are made
    unsigned only by a draw."""

    __slots__ = ("_state", "_previous")

    def __init__(self, seed: int, step: int, positions):
        self._state = (int(seed), int(step), positions)
        self._previous = None

    def __enter__(self) -> None:
        global _current
        self._previous, _current = _current, self._state

    def __exit__(self, *exc) -> bool:
        global _current
        _current = self._previous
        return False


def current():
    return _current


def layer_key(name: str) -> int:
    """A layer's stable key: from its qualified name in the model (same on every replica)."""
    return zlib.crc32(name.encode())


def _mix(z):
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniform(xp, shape, dtype, key: int):
    """Numbers in [0, 1) of `shape` (examples first) for the layer of `key`, from the current context.

    Outside a context they come from the default generator of `init`.
    """
    if _current is None:
        from .init import default_generator
        return xp.asarray(default_generator().random(shape).astype(dtype))
    seed, step, positions = _current
    positions = np.asarray(positions, dtype=np.uint64)
    if len(positions) != shape[0]:
        raise ValueError(f"random context has {len(positions)} example positions, the tensor has "
                         f"{shape[0]} examples (shape {shape})")
    base = (seed * 0xD1B54A32D192ED03 + step * 0xABC98388FB8FAC03 + (key + 1) * _GOLDEN) & _MASK
    per_example = math.prod(shape[1:])
    ex = _mix(xp.asarray(positions) * np.uint64(0x8CB92BA72F3D8DD7) + np.uint64(base))
    counters = xp.arange(per_example, dtype=np.uint64) * np.uint64(_GOLDEN)
    bits = _mix(ex[:, None] + counters[None, :])
    u = (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    return u.reshape(shape).astype(dtype, copy=False)

