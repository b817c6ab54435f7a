"""Compiled kernels for the CPU update: one pass over a block instead of one numpy call per term.

numpy runs an update rule as several calls per block (SGD with momentum: five; Adam: twelve),
each a pass over the block and a release and re-acquisition of the GIL. These kernels, compiled
by numba, do the same operations on each element in one loop, in the same order and in the
array's own precision, so the numbers are those of the numpy rules bit for bit (IEEE +, -, *, /
and sqrt are correctly rounded either way; numba contracts nothing into FMAs without fastmath,
and the scalars are rounded to the array's dtype first, as numpy does with a Python float). They
let go of the GIL for the whole block, so the update's threads run at once.

Used where they apply (`usable`: numpy arrays of float32 or float64, one-dimensional and
contiguous, blocks of MIN_SIZE entries or more; a scalar learning rate; a weight decay that is a scalar or, as --decay-params
matrices makes it, a per-entry array); everything else (cupy arrays, a parameter group's
per-entry learning rate, other dtypes, small blocks) takes the numpy rules. `ENABLED = False` turns them off
(tests compare the two paths). numba compiles each kernel on its first call for a dtype, and
keeps the machine code in its cache beside this file (`cache=True`; or in the user's cache
directory): a new process loads it. Where it can cache nowhere, each process compiles its own.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

log = logging.getLogger(__name__)

ENABLED = True  # False: the numpy rules everywhere (tests compare the two paths)

# Blocks smaller than this take numpy's rules: a kernel call costs more to dispatch than numpy's
# few calls on a small block (one block of 354 float32s: 12.2 us against 8.9 us a step; 2^16:
# 26.5 against 38.5 us), and a process whose blocks are all small never imports numba (0.2 s)
# nor loads the kernels (0.3 s more).
MIN_SIZE = 1 << 13

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_kernels = None  # the compiled functions, made on first use (numba is imported only then)
_preloading = False  # a `preload` thread is loading them
_loading = threading.Lock()


def usable(*arrays) -> bool:
    """Whether the kernels can run on these arrays (None entries are ignored): all numpy, of one
    float dtype (float32 or float64), one-dimensional, contiguous and of one size (the kernels
    index them all alike, unchecked: arrays that differ take numpy's rules, and numpy's error),
    at least MIN_SIZE entries."""
    if not ENABLED:
        return False
    first = None
    for a in arrays:
        if a is None:
            continue
        if type(a) is not np.ndarray or a.ndim != 1 or not a.flags.c_contiguous:
            return False
        if first is None:
            first = a
            if a.dtype not in _FLOATS or a.size < MIN_SIZE:
                return False
        elif a.dtype != first.dtype or a.size != first.size:
            return False
    if _kernels is not None:  # loaded: no lock to take, block after block
        return True
    if _preloading:  # numpy's rules until `preload`'s thread is done: the same numbers, and no wait
        return False
    return _load() is not None


def preload(size: int) -> None:
    """Load the kernels in a thread of this process's now, where blocks of `size` entries will
    use them: a parameter server builds its optimizer before its first update. Updates that come
    before they are loaded (numba's import and the kernels' cache take 0.4 s) run numpy's rules,
    bit for bit the same, instead of waiting."""
    global _preloading
    if ENABLED and _kernels is None and size >= MIN_SIZE and not _preloading:
        _preloading = True
        threading.Thread(target=_preload, name="dptrain-kernels", daemon=True).start()


def wait() -> bool:
    """Whether the kernels run in this process, once loaded (a `preload` thread's load is waited
    for): benchmarks time them, not the numpy rules that run meanwhile."""
    return ENABLED and _load() is not None


def _preload():
    global _preloading
    try:
        _load()
    finally:
        _preloading = False


def _load():
    """The compiled kernels (a namespace), or None where they cannot run here: numba missing (a
    platform without its wheels), or compiling failing, which is a warning and turns them off for
    this process. Where numba can cache them nowhere (a read-only install, no writable user cache
    directory), they are compiled for this process alone (about a second)."""
    global _kernels, ENABLED
    with _loading:
        if _kernels is not None or not ENABLED:
            return _kernels
        for cache in (True, False):
            try:
                kernels = _compile(cache)
                _warm(kernels)
            except ImportError:
                ENABLED = False
                return None
            except Exception as e:  # numba's errors have no common base class
                if cache:
                    log.info("the update's compiled kernels cannot be cached (%s): compiling them for this process",
                             str(e).splitlines()[0] if str(e) else type(e).__name__)
                    continue
                log.warning("the update's compiled kernels are off in this process (%s: %s); numpy's rules run "
                            "instead", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                ENABLED = False
                return None
            _kernels = kernels
            return _kernels


def _warm(kernels) -> None:
    """Compile (or load from the cache) each kernel for float32 once, so that a failure shows here."""
    a = np.zeros(4, np.float32)
    f = np.float32
    kernels.mean(a, (a, a), f(0.5), False)
    kernels.sgd(a, a, f(0), f(0), a, 0)
    kernels.sgd_momentum(a, a, a.copy(), f(0), f(0), f(1), False, False, f(0), a, 0, False)
    kernels.adam(a, a, a.copy(), a + 1, f(0), f(0), f(0), f(0), f(0), f(1), f(1), f(0), a, f(1), f(0), f(1), 0, False)


def _compile(cache: bool = True):
    """The kernels of kernel_loops.py, with numba's cache on (`cache`) or not."""
    from types import SimpleNamespace

    from . import kernel_loops as loops
    kernels = SimpleNamespace(mean=loops.mean, sgd=loops.sgd, sgd_momentum=loops.sgd_momentum, adam=loops.adam)
    if cache:
        for kernel in vars(kernels).values():
            kernel.enable_caching()  # raises where numba can cache nowhere
    return kernels


def mean(dst, grads, count: int) -> None:
    """dst = (grads[0] + ...) / count, as step.mean_gradient computes it (a count that is a power
    of two multiplies by its exact reciprocal)."""
    f = dst.dtype.type
    power = count > 0 and count & (count - 1) == 0
    if len({g.flags.writeable for g in grads}) > 1:  # one array type for the tuple: read-only views of all
        grads = [_read_only(g) for g in grads]
    _kernels.mean(dst, tuple(grads), f(1.0 / count) if power else f(count), not power)


def _read_only(a):
    view = a.view()
    view.flags.writeable = False
    return view


def _decay(weight_decay):
    """(scalar, per-entry array or None) of a weight decay that is either."""
    return (0.0, weight_decay) if isinstance(weight_decay, np.ndarray) else (weight_decay, None)


def sgd(param, grad, buf, lr, momentum, dampening, nesterov, weight_decay, first_step) -> None:
    """optimizers.sgd_update in one pass: a scalar `lr`; `weight_decay` a scalar or per-entry array.
    (An array the rule does not use is given as `grad`, which no kernel writes: one that aliased
    a written array would keep the loop from its vectorized form.)"""
    f = param.dtype.type
    wd, wd_e = _decay(weight_decay)
    decay = 2 if wd_e is not None else 1 if wd != 0 else 0
    wd_e = grad if wd_e is None else wd_e
    if momentum:
        _kernels.sgd_momentum(param, grad, buf, f(lr), f(momentum), f(1 - dampening), bool(dampening),
                              bool(nesterov), f(wd), wd_e, decay, bool(first_step))
    else:
        _kernels.sgd(param, grad, f(lr), f(wd), wd_e, decay)


def adam(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay, decoupled) -> None:
    """optimizers.adam_update in one pass: a scalar `lr`; `weight_decay` a scalar or per-entry array."""
    f = param.dtype.type
    wd, wd_e = _decay(weight_decay)
    mode = 0 if wd_e is None and wd == 0 else 2 if decoupled else 1
    _kernels.adam(param, grad, m, v, f(lr / (1 - beta1 ** step)), f(1 - beta1), f(beta1), f(1 - beta2), f(beta2),
                  f(1 - beta2 ** step), f(eps), f(wd), grad if wd_e is None else wd_e, f(1 - lr * wd), f(lr), f(1),
                  mode, wd_e is not None)
