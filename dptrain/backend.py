"""The array backend: numpy on the CPU, cupy on a GPU.

This is the only module that imports cupy. Everything else asks it for the array
module that matches an array (`array_module`) or a device name (`xp_for`), so the
package works unchanged when cupy is absent.
"""

from __future__ import annotations

import os

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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_RETAINED = False


def retain_freed_memory() -> bool:
    """Have glibc's malloc keep freed arrays for the next allocation instead of handing them back
    to the kernel; True where it took effect (glibc), False elsewhere. Once per process.

    A step allocates its activations and temporaries afresh and frees them again. In a Ray
    worker each of them above 128 KiB was mapped anew and unmapped on free, glibc's threshold
    never rising there: the recipe's step paid 12,000 page faults and 30 ms of system time
    (a fifth of it). Arrays up to 32 MiB (glibc's most) now come from the heap, and up to
    1 GiB freed at its top stays with the process, which keeps its own peak in any case.
    """
    global _RETAINED
    if _RETAINED:
        return True
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
        return False
    _RETAINED = bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    return _RETAINED


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity where the system says, else the machine's)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def blas_kernels() -> str | None:
    """The kernels numpy's OpenBLAS runs in this process, by OpenBLAS's own name for them
    ("SkylakeX", "Haswell", ...), or None where numpy's BLAS is not an OpenBLAS that says.

    OpenBLAS picks them for the CPU when it loads, unless OPENBLAS_CORETYPE names others; they
    set the speed of every matrix product (1.5-1.7x between Haswell's and SkylakeX's on an AMD
    Zen 5), so a benchmark's results record them (scaling/bench.py, `machine`)."""
    import ctypes
    for path in _mapped_libraries("openblas"):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                       "openblas_get_corename64_", "openblas_get_corename"):
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                return (fn() or b"").decode("ascii", "replace").strip() or None
    return None


def _mapped_libraries(part: str) -> list:
    """The shared libraries mapped into this process (Linux) whose file name holds `part`."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            fields = [line.split(None, 5) for line in f]
    except OSError:
        return []
    paths = {f[5].strip() for f in fields if len(f) == 6}
    return sorted(p for p in paths if part in os.path.basename(p).lower() and ".so" in os.path.basename(p))


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


# The rational approximation XLA uses for float32 erf (JAX's on the CPU): x P(x^2) / Q(x^2)
# on x clipped to [-4, 4], within 1e-7 of erf in exact arithmetic and 4.5e-7 evaluated in
# float32 (measured over [-6, 6]); a float32 GELU has no use for more, and it is five times
# faster than scipy's element-by-element erf.
_ERF32_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
            -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_ERF32_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
            -1.42647390514189e-02)


def _horner(x2: np.ndarray, coefficients: tuple) -> np.ndarray:
    """sum(c_i x2^(n - i)), highest power first, in place on one new array."""
    dt = x2.dtype.type
    acc = x2 * dt(coefficients[0])
    for c in coefficients[1:-1]:
        acc += dt(c)
        acc *= x2
    acc += dt(coefficients[-1])
    return acc


def _erf32(a: np.ndarray) -> np.ndarray:
    x = np.clip(a, a.dtype.type(-4), a.dtype.type(4))
    x2 = x * x
    p = _horner(x2, _ERF32_P)
    p *= x
    p /= _horner(x2, _ERF32_Q)
    return p


def erf(a):
    """The error function, elementwise (exact GELU needs it).

    float64 to full precision: scipy's when scipy is installed (scikit-learn brings it),
    else Python's math.erf element by element (correct, slower); cupy has its own.
    float32 on the CPU: XLA's float32 rational approximation (`_erf32`, 4.5e-7 at most
    from the exact value), which costs a fifth of scipy's.
    """
    if _cupy is not None and isinstance(a, _cupy.ndarray):
        import cupyx.scipy.special  # part of cupy
        return cupyx.scipy.special.erf(a)
    if a.dtype == np.float32:
        return _erf32(a)
    try:
        from scipy.special import erf as _erf
    except ImportError:
        import math
        return np.vectorize(math.erf, otypes=[a.dtype])(a)
    return _erf(a).astype(a.dtype, copy=False)
