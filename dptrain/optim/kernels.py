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
    return _kernels is not None or _load() is not None  # loaded: no lock to take, block after block


def preload(size: int) -> None:
    """Load the kernels in a thread of this process's now, where blocks of `size` entries will
    use them: a parameter server builds its optimizer well before its first update, which then
    need not wait for numba's import and the kernels' cache (about half a second)."""
    if ENABLED and _kernels is None and size >= MIN_SIZE:
        threading.Thread(target=_load, name="dptrain-kernels", daemon=True).start()


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
    from types import SimpleNamespace

    from numba import njit

    # error_model="numpy": a division by zero is IEEE's inf or nan, as in numpy, not Python's
    # ZeroDivisionError, whose check in every iteration kept the loops from being vectorized
    # (Adam's block of 2^16: 178 us scalar, 39 us in SIMD registers)
    jit = njit(nogil=True, cache=cache, error_model="numpy")

    @jit
    def mean(dst, grads, scale, divide):
        # dst = (grads[0] + grads[1] + ...) / scale (or * scale): step.mean_gradient's adds, in rank order
        for i in range(dst.size):
            s = grads[0][i]
            for k in range(1, len(grads)):
                s += grads[k][i]
            dst[i] = s / scale if divide else s * scale

    @njit(inline="always")
    def decayed(grad, param, wd, wd_e, decay, i):
        # the gradient with weight decay (L2); decay 0: none, 1: wd, 2: wd_e[i] (per entry)
        if decay == 2:
            return grad[i] + wd_e[i] * param[i]
        if decay == 1:
            return grad[i] + wd * param[i]
        return grad[i]

    @jit
    def sgd(param, grad, lr, wd, wd_e, decay):
        # optimizers.sgd_update without momentum
        for i in range(param.size):
            param[i] = param[i] - lr * decayed(grad, param, wd, wd_e, decay, i)

    @jit
    def sgd_momentum(param, grad, buf, lr, momentum, damp, dampening, nesterov, wd, wd_e, decay, first):
        # optimizers.sgd_update with momentum, element by element
        for i in range(param.size):
            g = decayed(grad, param, wd, wd_e, decay, i)
            if first:
                b = g
            else:
                b = buf[i] * momentum
                b = b + (damp * g if dampening else g)
            buf[i] = b
            g = g + momentum * b if nesterov else b
            param[i] = param[i] - lr * g

    @jit
    def adam(param, grad, m, v, lr_bias1, one_m_beta1, beta1, one_m_beta2, beta2, bias2, eps, wd, wd_e, shrink,
             lr, one, mode, per_entry):
        # optimizers.adam_update, element by element; mode 0: no decay, 1: L2 (Adam), 2: decoupled
        # (AdamW); per_entry: the decay is wd_e[i] (a parameter group's), the shrink 1 - lr * wd_e[i]
        for i in range(param.size):
            p = param[i]
            w = wd_e[i] if per_entry else wd
            if mode == 2:
                p = p * (one - lr * w if per_entry else shrink)
                g = grad[i]
            elif mode == 1:
                g = grad[i] + w * p
            else:
                g = grad[i]
            mi = m[i] * beta1 + g * one_m_beta1
            vi = v[i] * beta2 + (g * g) * one_m_beta2
            m[i] = mi
            v[i] = vi
            t = np.sqrt(vi / bias2) + eps
            param[i] = p - (mi / t) * lr_bias1

    return SimpleNamespace(mean=mean, sgd=sgd, sgd_momentum=sgd_momentum, adam=adam)


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
