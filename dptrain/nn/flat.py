"""The flat buffer: every parameter a view into one 1-D array, every grad a view into another.

With the parameters in one contiguous array, shipping a replica's gradient is
shipping one array, loading new parameters is one copy, and an optimizer step
is a few vector operations over the whole model.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .. import backend


class FlatBuffer:
    """`data` and `grad`: the 1-D arrays behind a list of parameters, in their order.

    It keeps the parameters' shapes and offsets, not the parameters themselves
    (each parameter points at its buffer, so a back reference would be a cycle).
    """

    __slots__ = ("data", "grad", "shapes", "offsets", "zeroed", "unsettled", "_gaps", "__weakref__")

    def __init__(self, data, grad, shapes, offsets):
        self.data = data
        self.grad = grad
        self.shapes = shapes
        self.offsets = offsets
        # zeroed[i]: parameter i's gradient is known to be zero (set by zero_grad,
        # cleared by the first backward that writes it). Backward then writes the
        # gradient straight into place instead of adding it to zeros: a whole pass
        # over the buffer saved per step. Code that writes .grad by hand after
        # zero_grad() and then calls backward() must call mark_written().
        self.zeroed = [False] * len(shapes)
        self.unsettled = False  # a lazy zero_grad's marks stand for zeros not yet written (settle)
        self._gaps = None  # the indices of the alignment gaps (settle zeroes them)

    def zero_grad(self, lazy: bool = False) -> None:
        """Every gradient is zero from now on. `lazy`: the zeros are not written, only marked (the
        first write of each parameter's gradient in a backward overwrites it: claim); the caller
        runs its backward passes and then `settle()`s, which zeroes the gradients no backward wrote
        and the alignment gaps between parameters. It saves a pass over the buffer a step
        (Replica.compute_gradients: 0.3-0.6 ms of the 12-13 ms of a 784-1024-1024-10 worker's
        batch of 128)."""
        if not lazy:
            self.grad.fill(0)
        self.zeroed = [True] * len(self.shapes)
        self.unsettled = lazy

    def settle(self) -> None:
        """After a lazy zero_grad and the backward passes: zero each gradient none of them wrote,
        and the gaps (no backward writes them, but what else wrote the buffer may have)."""
        if not self.unsettled:
            return
        for zeroed, shape, o in zip(self.zeroed, self.shapes, self.offsets):
            if zeroed:
                self.grad[o:o + _numel(shape)] = 0
        if self._gaps is None:
            ends = [o + _numel(s) for s, o in zip(self.shapes, self.offsets)]
            gaps = np.concatenate([np.arange(e, b, dtype=np.int64)
                                   for e, b in zip(ends, list(self.offsets[1:]) + [self.size])])
            self._gaps = backend.array_module(self.grad).asarray(gaps)
        if self._gaps.size:
            self.grad[self._gaps] = 0
        self.unsettled = False

    def claim(self, i: int) -> bool:
        """Whether parameter i's gradient is known to be zero; it no longer is once claimed (the
        claimer writes it: tensor.claim_grad)."""
        if not self.zeroed[i]:
            return False
        self.zeroed[i] = False
        return True

    def mark_written(self) -> None:
        self.zeroed = [False] * len(self.shapes)

    @property
    def size(self) -> int:
        """Elements in the flat arrays (the parameters plus alignment gaps)."""
        return int(self.data.size)

    @property
    def num_parameters(self) -> int:
        return sum(_numel(s) for s in self.shapes)

    def views(self, flat) -> list:
        """Per-parameter views of a flat array laid out like this buffer (no copies)."""
        return [flat[o:o + _numel(s)].reshape(s) for s, o in zip(self.shapes, self.offsets)]


ALIGN_BYTES = 64


def aligned_zeros(xp, n, dtype):
    """A zeroed 1-D array of n elements whose data starts on an ALIGN_BYTES boundary."""
    if xp is not np:
        return xp.zeros(n, dtype=dtype)  # cupy allocations are 256-byte aligned
    pad = ALIGN_BYTES // dtype.itemsize
    raw = np.zeros(n + pad, dtype=dtype)
    shift = (-raw.ctypes.data % ALIGN_BYTES) // dtype.itemsize
    return raw[shift:shift + n]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _layout(shapes, dtype):
    """Offsets and total size: each parameter starts on a 64-byte boundary.

    BLAS runs up to 20% slower on misaligned matrices. The gaps (under 64 bytes
    each) hold zeros and get zero gradients, so every optimizer leaves them at zero.
    """
    step = max(1, ALIGN_BYTES // dtype.itemsize)
    offsets, total = [], 0
    for s in shapes:
        total = -(-total // step) * step
        offsets.append(total)
        total += _numel(s)
    return offsets, -(-total // step) * step


def flatten(params: Sequence, data=None, grad=None, data_is_current: bool = False) -> FlatBuffer:
    """Bind `params` (nn.Parameter) to one flat data array and one flat grad array.

    If they already are, in this order, and no storage is given, the existing
    buffer is returned and nothing moves. Otherwise their current values are
    copied into a new buffer and each parameter's `.data` and `.grad` become
    views into it (gradients already accumulated are kept). `data` and `grad`,
    1-D arrays of the buffer's size (alignment gaps included: `FlatBuffer.size` of
    the same parameters), are used as the storage when given (shared memory, say)
    instead of new arrays. With `data_is_current` the given `data` already holds
    the values (another process's parameters, possibly read-only): it is bound as
    is and nothing is written to it.
    """
    params = list(params)
    if not params:
        raise ValueError("flatten: no parameters given (the model has none?)")
    if len({id(p) for p in params}) != len(params):
        raise ValueError("flatten: the same parameter appears twice in the list")
    buf = getattr(params[0], "_flat", None)
    if data is None and grad is None and buf is not None and len(buf.shapes) == len(params) and all(
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
    offsets, total = _layout(shapes, dtype)
    for name, storage in (("data", data), ("grad", grad)):
        if storage is not None and (storage.shape != (total,) or storage.dtype != dtype):
            raise ValueError(f"flatten: {name} storage of shape {storage.shape} and dtype {storage.dtype} does "
                             f"not fit ({total},) {dtype}")
    if data is None:
        data = aligned_zeros(xp, total, dtype)
    elif not data_is_current:
        data[...] = 0
    if grad is None:
        grad = aligned_zeros(xp, total, dtype)
    else:
        grad[...] = 0
    buf = FlatBuffer(data, grad, shapes, offsets)
    data_views, grad_views = buf.views(buf.data), buf.views(buf.grad)
    for i, (p, dv, gv) in enumerate(zip(params, data_views, grad_views)):
        if not data_is_current:
            dv[...] = p.data
        if p.grad is not None:
            gv[...] = p.grad
        p.data, p.grad = dv, gv
        p._flat, p._flat_index = buf, i
    return buf
