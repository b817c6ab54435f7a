"""The flat buffer: every parameter a view into one 1-D array, every grad a view into another.

With the parameters in one contiguous array, shipping a replica's gradient is
shipping one array, loading new parameters is one copy, and an optimizer step
is a few vector operations over the whole model.
"""

from __future__ import annotations

from typing import Sequence

from .. import backend


class FlatBuffer:
    """`data` and `grad`: the 1-D arrays behind a list of parameters, in their order.

    It keeps the parameters' shapes and offsets, not the parameters themselves
    (each parameter points at its buffer, so a back reference would be a cycle).
    """

    __slots__ = ("data", "grad", "shapes", "offsets", "__weakref__")

    def __init__(self, data, grad, shapes, offsets):
        self.data = data
        self.grad = grad
        self.shapes = shapes
        self.offsets = offsets

    @property
    def size(self) -> int:
        return int(self.data.size)

    def views(self, flat) -> list:
        """Per-parameter views of a flat array laid out like this buffer (no copies)."""
        return [flat[o:o + _numel(s)].reshape(s) for s, o in zip(self.shapes, self.offsets)]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def flatten(params: Sequence) -> FlatBuffer:
    """Bind `params` (nn.Parameter) to one flat data array and one flat grad array.

    If they already are, in this order, the existing buffer is returned and
    nothing moves. Otherwise their current values are copied into a new buffer
    and each parameter's `.data` and `.grad` become views into it (gradients
    already accumulated are kept).
    """
    params = list(params)
    if not params:
        raise ValueError("flatten: no parameters given (the model has none?)")
    if len({id(p) for p in params}) != len(params):
        raise ValueError("flatten: the same parameter appears twice in the list")
    buf = getattr(params[0], "_flat", None)
    if buf is not None and len(buf.shapes) == len(params) and all(
            getattr(p, "_flat", None) is buf and p._flat_index == i and p.data.shape == buf.shapes[i]
            for i, p in enumerate(params)):
        return buf

    dtype, device = params[0].data.dtype, params[0].device
    for p in params:
        if p.data.dtype != dtype or p.device != device:
            raise ValueError(f"flatten: parameters must share dtype and device; got {p.data.dtype} on "
                             f"{p.device} next to {dtype} on {device}")
    xp = backend.array_module(params[0].data)
    shapes = [tuple(p.data.shape) for p in params]
    offsets, total = [], 0
    for s in shapes:
        offsets.append(total)
        total += _numel(s)
    buf = FlatBuffer(xp.empty(total, dtype=dtype), xp.zeros(total, dtype=dtype), shapes, offsets)
    data_views, grad_views = buf.views(buf.data), buf.views(buf.grad)
    for i, (p, dv, gv) in enumerate(zip(params, data_views, grad_views)):
        dv[...] = p.data
        if p.grad is not None:
            gv[...] = p.grad
        p.data, p.grad = dv, gv
        p._flat, p._flat_index = buf, i
    return buf
