"""The array backend: numpy on the CPU, cupy on a GPU.

This is the only module that imports cupy. Everything else asks it for the array
module that matches an array (`array_module`) or a device name (`xp_for`), so the
package works unchanged when cupy is absent.
"""

from __future__ import annotations

import numpy as np

try:  # cupy is optional: the `gpu` extra installs it
    import cupy as _cupy
except Exception:  # ImportError, or a cupy build that cannot find CUDA
    _cupy = None

DEVICES = ("cpu", "cuda")


def gpu_available() -> bool:
    """True when cupy imports and sees at least one CUDA device."""
    if _cupy is None:
        return False
    try:
        return _cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def array_module(a):
    """numpy or cupy, whichever owns the array `a`."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return _cupy
    return np


def xp_for(device: str):
    """The array module for a device name ("cpu" or "cuda")."""
    if device == "cpu":
        return np
    if device == "cuda":
        if not gpu_available():
            raise RuntimeError("device 'cuda' asked for, but cupy is not installed or sees no GPU "
                               "(install the extra: pip install 'dptrain[gpu]')")
        return _cupy
    raise ValueError(f"unknown device {device!r}: expected one of {DEVICES}")


def device_of(a) -> str:
    return "cuda" if array_module(a) is not np else "cpu"


def to_numpy(a) -> np.ndarray:
    """A numpy array with the data of `a` (copied off the GPU if needed)."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return _cupy.asnumpy(a)
    return np.asarray(a)


def to_device(a, device: str):
    """The array `a` on `device`; no copy when it is already there."""
    xp = xp_for(device)
    if array_module(a) is xp:
        return a
    if xp is np:
        return to_numpy(a)
    return xp.asarray(a)


def scatter_add(target, index, values) -> None:
    """target[index] += values, with repeated indices adding up (numpy's add.at)."""
    if _cupy is not None and isinstance(target, _cupy.ndarray):
        import cupyx  # part of cupy

        cupyx.scatter_add(target, index, values)
    else:
        np.add.at(target, index, values)


def as_strided(a, shape, strides):
    """A view of `a` with the given shape and strides (bytes), for numpy or cupy arrays."""
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        return _cupy.lib.stride_tricks.as_strided(a, shape=shape, strides=strides)
    return np.lib.stride_tricks.as_strided(a, shape=shape, strides=strides, writeable=False)


def erf(a):
    """The error function, elementwise, to full precision (exact GELU needs it).

    cupy has it; on the CPU scipy's is used when scipy is installed (scikit-learn brings
    it), else Python's math.erf element by element (correct, slower).
    """
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        import cupyx.scipy.special  # part of cupy
        return cupyx.scipy.special.erf(a)
    try:
        from scipy.special import erf as _erf
    except ImportError:
        import math
        return np.vectorize(math.erf, otypes=[a.dtype])(a)
    return _erf(a).astype(a.dtype, copy=False)
