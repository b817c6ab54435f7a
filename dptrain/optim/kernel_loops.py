"""The update's loops, compiled by numba: kernels.py imports this module on first use only
(importing numba takes 0.2 s) and switches numba's cache on for them (`kernels._compile`).

They are module-level functions, not closures: numba keys a cached closure on its free variables,
and the compiled helper among them (`decayed`) is a new object in every process, so each process
missed the cache and compiled `sgd` and `sgd_momentum` again (about 0.4 s before a run's first
update) and added a file to the cache.
"""

import numpy as np
from numba import njit

# error_model="numpy": a division by zero is IEEE's inf or nan, as in numpy, not Python's
# ZeroDivisionError, whose check in every iteration kept the loops from being vectorized
# (Adam's block of 2^16: 178 us scalar, 39 us in SIMD registers)
_jit = njit(nogil=True, error_model="numpy")


@_jit
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


@_jit
def sgd(param, grad, lr, wd, wd_e, decay):
    # optimizers.sgd_update without momentum
    for i in range(param.size):
        param[i] = param[i] - lr * decayed(grad, param, wd, wd_e, decay, i)


@_jit
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


@_jit
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
