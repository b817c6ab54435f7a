"""Finite-difference gradient checks shared by the engine tests (CPU and GPU)."""

import numpy as np

import dptrain as dp
from dptrain import backend


def numeric_grad(f, arrays, i, eps=1e-6):
    """Central differences of the scalar sum(f(*arrays) * weights) with respect to arrays[i]."""
    x = arrays[i]
    grad = np.zeros_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for k in range(flat.size):
        old = flat[k]
        flat[k] = old + eps
        hi = f(*arrays)
        flat[k] = old - eps
        lo = f(*arrays)
        flat[k] = old
        gflat[k] = (hi - lo) / (2 * eps)
    return grad


def check_op(fn, *shapes, rng=None, positive=False, device="cpu", rtol=1e-5, atol=1e-7):
    """The gradient of `fn` (tensors -> tensor) against central differences, in float64.

    The output is reduced with random weights so every output element's gradient
    matters; each input gets its own check.
    """
    rng = rng or np.random.default_rng(0)
    arrays = [rng.uniform(0.5, 2.0, s) if positive else rng.standard_normal(s) for s in shapes]
    xp = backend.xp_for(device)

    def value(*arrs):
        out = fn(*[dp.Tensor(xp.asarray(a), dtype="float64") for a in arrs])
        return float((backend.to_numpy(out.data) * weights).sum())

    probe = fn(*[dp.Tensor(xp.asarray(a), dtype="float64") for a in arrays])
    weights = rng.standard_normal(probe.shape)
    tensors = [dp.Tensor(xp.asarray(a), requires_grad=True, dtype="float64") for a in arrays]
    out = fn(*tensors)
    out.backward(xp.asarray(weights))
    for i, t in enumerate(tensors):
        expected = numeric_grad(value, [a.copy() for a in arrays], i)
        assert t.grad is not None, f"input {i} got no gradient"
        np.testing.assert_allclose(backend.to_numpy(t.grad), expected, rtol=rtol, atol=atol,
                                   err_msg=f"gradient of input {i} (shape {shapes[i]})")
