"""Stateless layers and losses: every derivative rule of the nn layers, each beside its forward.

`linear`, `cross_entropy`, the convolutions, pooling, `layer_norm`, `dropout`,
`embedding`, `gelu` and `self_attention` are single fused graph nodes: one forward
in a few array operations, one backward closure that keeps only what it needs.
Convolution and pooling work on strided windows (im2col as a view, one copy and
one matrix product per layer); their backward adds each kernel offset's slice back
(col2im), a loop over the kernel's few offsets, never over positions.

Why one file of about 460 lines: it is the nn library's table of derivative rules,
each beside its forward, and the rules share helpers (strided windows, the
weight-and-bias gradients); tests/test_layers.py checks each against finite differences.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from .. import backend
from ..tensor import Tensor, claim_grad
from . import random as nn_random

REDUCTIONS = ("mean", "sum")


def _check_reduction(reduction: str, fn: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: unknown reduction {reduction!r}; expected one of {REDUCTIONS}")


def _weight_bias_grads(g, inputs, weight: Tensor, bias: Tensor | None) -> tuple:
    """The gradients of weight and bias of rows = inputs @ weight.reshape(out, -1).T + bias, given
    g (rows, out): written straight into the flat gradient buffer where it allows (claim_grad),
    and then returned as None, else returned as new arrays."""
    gw = gb = None
    if weight.requires_grad:
        dest = claim_grad(weight)
        if dest is None:
            gw = (g.T @ inputs).reshape(weight.shape)
        else:
            backend.array_module(g).matmul(g.T, inputs, out=dest.reshape(g.shape[1], -1))
    if bias is not None and bias.requires_grad:
        dest = claim_grad(bias)
        if dest is None:
            gb = g.sum(axis=0)
        else:
            g.sum(axis=0, out=dest)
    return gw, gb


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T + bias for x of shape (..., in) and weight of shape (out, in).

    Leading axes (a batch, or batch and sequence positions) are flattened into one
    for a single matrix product each way.
    """
    x = weight._lift(x)
    a, w = x.data, weight.data
    if a.ndim < 1 or w.ndim != 2 or a.shape[-1] != w.shape[1]:
        raise ValueError(f"linear: input of shape {a.shape} does not fit weight of shape {w.shape} "
                         f"(expected (..., {w.shape[1] if w.ndim == 2 else '?'}))")
    lead = a.shape[:-1]
    a2 = a.reshape(-1, a.shape[-1])
    out = a2 @ w.T
    if bias is not None:
        out += bias.data
    x_grad = x.requires_grad

    def _backward(g):
        g = g.reshape(-1, w.shape[0])
        gx = (g @ w).reshape(a.shape) if x_grad else None
        return (gx,) + _weight_bias_grads(g, a2, weight, bias)
    parents = (x, weight) if bias is None else (x, weight, bias)
    return Tensor._make(out.reshape(lead + (w.shape[0],)), parents, _backward, "linear")


def relu(x: Tensor) -> Tensor:
    return x.relu()


def tanh(x: Tensor) -> Tensor:
    return x.tanh()


def sigmoid(x: Tensor) -> Tensor:
    return x.sigmoid()


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    return x.softmax(axis)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    return x.log_softmax(axis)


def cross_entropy(logits: Tensor, target, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy of (..., classes) logits against integer class labels of shape (...).

    (batch, classes) against (batch,) is the usual case; (batch, positions, classes)
    against (batch, positions) scores every position of a sequence. "mean" averages
    over every scored label, "sum" adds them up. Fused: one node computes the stable
    log-softmax and picks the labels' entries; its backward is (softmax - one_hot)
    times the incoming gradient.
    """
    _check_reduction(reduction, "cross_entropy")
    z = logits.data
    xp = backend.array_module(z)
    y = target.data if isinstance(target, Tensor) else target
    y = xp.asarray(y)
    if z.ndim < 2:
        raise ValueError(f"cross_entropy: logits must be (batch, ..., classes), got shape {z.shape}")
    if y.shape != z.shape[:-1]:
        raise ValueError(f"cross_entropy: labels of shape {y.shape} do not match logits of shape {z.shape} "
                         f"(expected labels of shape {z.shape[:-1]})")
    if y.dtype.kind not in "iu":
        if y.size and not bool(xp.all(y == xp.round(y))):
            raise ValueError("cross_entropy: labels must be integer class indices")
        y = y.astype(xp.int64)
    shape = z.shape
    z = z.reshape(-1, shape[-1])
    y = y.reshape(-1)
    n, classes = z.shape
    if n and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ValueError(f"cross_entropy: labels must lie in [0, {classes}), got range "
                         f"[{int(y.min())}, {int(y.max())}]")
    rows = xp.arange(n)
    shifted = z - z.max(axis=1, keepdims=True)
    logsumexp = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    losses = logsumexp[:, 0] - shifted[rows, y]
    total = losses.sum()
    scale = 1.0 / n if reduction == "mean" and n else 1.0
    out = (total * scale).astype(z.dtype) if scale != 1.0 else total  # the sum's dtype is the logits'

    def _backward(g):
        grad = xp.exp(shifted - logsumexp)  # softmax
        grad[rows, y] -= 1
        grad *= g * z.dtype.type(scale)
        return (grad.reshape(shape),)
    return Tensor._make(out, (logits,), _backward, "cross_entropy")


def mse_loss(pred: Tensor, target, reduction: str = "mean") -> Tensor:
    """Squared error, averaged over all elements ("mean") or summed ("sum")."""
    _check_reduction(reduction, "mse_loss")
    target = pred._lift(target)
    if pred.shape != target.shape:
        raise ValueError(f"mse_loss: prediction of shape {pred.shape} and target of shape "
                         f"{target.shape} differ (reshape the target to match)")
    diff = pred - target
    sq = (diff * diff).sum()
    return sq / pred.size if reduction == "mean" else sq


# --------------------------------------------------------------------------- convolution and pooling

def _tuple(value, nd: int, what: str) -> tuple:
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,) * nd
    if len(items) != nd or any(int(v) != v for v in items):
        raise ValueError(f"{what} must be an int or {nd} ints, got {value!r}")
    return tuple(int(v) for v in items)


def _pad(xp, a, padding: tuple, value: float = 0.0):
    if not any(padding):
        return a
    return xp.pad(a, [(0, 0), (0, 0)] + [(p, p) for p in padding], constant_values=value)


def _windows(a, kernel: tuple, stride: tuple):
    """The sliding windows of a (N, C, *spatial) array as a view of shape (N, C, *out, *kernel)."""
    nd = len(kernel)
    spatial = a.shape[2:]
    out = tuple((s - k) // st + 1 for s, k, st in zip(spatial, kernel, stride))
    shape = a.shape[:2] + out + kernel
    strides = a.strides[:2] + tuple(a.strides[2 + i] * stride[i] for i in range(nd)) + a.strides[2:]
    return backend.as_strided(a, shape, strides)


def _add_windows(dest, gwin, kernel: tuple, stride: tuple, out: tuple) -> None:
    """col2im: add gwin (N, C, *out, *kernel) back into dest (N, C, *padded), one kernel offset at a time."""
    for offset in itertools.product(*(range(k) for k in kernel)):
        target = (slice(None), slice(None)) + tuple(
            slice(o, o + st * (n - 1) + 1, st) for o, st, n in zip(offset, stride, out))
        dest[target] += gwin[(Ellipsis,) + offset]


def _unpad(a, padding: tuple):
    if not any(padding):
        return a
    return a[(slice(None), slice(None)) + tuple(slice(p, a.shape[2 + i] - p) for i, p in enumerate(padding))]


def _check_spatial(fn: str, a, nd: int, padded: tuple, kernel: tuple) -> None:
    if a.ndim != nd + 2:
        dims = "(batch, channels, length)" if nd == 1 else "(batch, channels, height, width)"
        raise ValueError(f"{fn}: input must be {dims}, got shape {a.shape}")
    if any(s < k for s, k in zip(padded, kernel)):
        raise ValueError(f"{fn}: input of shape {a.shape} (padded {padded}) is smaller than the kernel {kernel}")


def conv(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0) -> Tensor:
    """N-d convolution (cross-correlation, as PyTorch's) of x (N, C_in, *spatial) with
    weight (C_out, C_in, *kernel): im2col as a strided view, then one matrix product."""
    x = weight._lift(x)
    a, w = x.data, weight.data
    nd = w.ndim - 2
    xp = backend.array_module(a)
    stride, padding = _tuple(stride, nd, "stride"), _tuple(padding, nd, "padding")
    kernel = tuple(w.shape[2:])
    fn = f"conv{nd}d"
    if a.ndim == nd + 2 and a.shape[1] != w.shape[1]:
        raise ValueError(f"{fn}: input of shape {a.shape} has {a.shape[1]} channels, the weight "
                         f"{tuple(w.shape)} expects {w.shape[1]}")
    padded_shape = tuple(s + 2 * p for s, p in zip(a.shape[2:], padding))
    _check_spatial(fn, a, nd, padded_shape, kernel)
    n, c_in, c_out = a.shape[0], w.shape[1], w.shape[0]
    ap = _pad(xp, a, padding)
    win = _windows(ap, kernel, stride)  # (N, C, *out, *kernel)
    out_sp = win.shape[2:2 + nd]
    positions = math.prod(out_sp)
    to_rows = (0,) + tuple(range(2, 2 + nd)) + (1,) + tuple(range(2 + nd, 2 + 2 * nd))
    cols = win.transpose(to_rows).reshape(n * positions, -1)  # the one copy: (N*P, C*K)
    wmat = w.reshape(c_out, -1)
    out = cols @ wmat.T  # (N*P, C_out)
    if bias is not None:
        out += bias.data
    channels_first = (0, nd + 1) + tuple(range(1, nd + 1))
    out = out.reshape((n,) + out_sp + (c_out,)).transpose(channels_first)
    x_grad = x.requires_grad

    def _backward(g):
        gmat = g.transpose((0,) + tuple(range(2, 2 + nd)) + (1,)).reshape(n * positions, c_out)
        gw, gb = _weight_bias_grads(gmat, cols, weight, bias)
        gx = None
        if x_grad:
            gcols = (gmat @ wmat).reshape((n,) + out_sp + (c_in,) + kernel)
            gwin = gcols.transpose((0, nd + 1) + tuple(range(1, nd + 1)) + tuple(range(nd + 2, 2 * nd + 2)))
            gxp = xp.zeros(ap.shape, dtype=a.dtype)
            _add_windows(gxp, gwin, kernel, stride, out_sp)
            gx = _unpad(gxp, padding)
        return gx, gw, gb
    parents = (x, weight) if bias is None else (x, weight, bias)
    return Tensor._make(out, parents, _backward, fn)


def conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0) -> Tensor:
    """x (N, C_in, L), weight (C_out, C_in, K) -> (N, C_out, L_out)."""
    if weight.ndim != 3:
        raise ValueError(f"conv1d: weight must be (out_channels, in_channels, kernel), got shape {weight.shape}")
    return conv(x, weight, bias, stride, padding)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0) -> Tensor:
    """x (N, C_in, H, W), weight (C_out, C_in, KH, KW) -> (N, C_out, H_out, W_out)."""
    if weight.ndim != 4:
        raise ValueError(f"conv2d: weight must be (out_channels, in_channels, kh, kw), got shape {weight.shape}")
    return conv(x, weight, bias, stride, padding)


def _pool(x: Tensor, nd: int, kernel_size, stride, padding, kind: str) -> Tensor:
    a = x.data
    xp = backend.array_module(a)
    kernel = _tuple(kernel_size, nd, "kernel_size")
    stride = kernel if stride is None else _tuple(stride, nd, "stride")
    padding = _tuple(padding, nd, "padding")
    fn = f"{kind}_pool{nd}d"
    if any(2 * p > k for p, k in zip(padding, kernel)):
        raise ValueError(f"{fn}: padding {padding} must be at most half the kernel {kernel}")
    padded_shape = tuple(s + 2 * p for s, p in zip(a.shape[2:], padding)) if a.ndim == nd + 2 else ()
    _check_spatial(fn, a, nd, padded_shape, kernel)
    ap = _pad(xp, a, padding, -np.inf if kind == "max" else 0.0)
    win = _windows(ap, kernel, stride)
    out_sp = win.shape[2:2 + nd]
    k = math.prod(kernel)
    if kind == "max":
        flat = win.reshape(win.shape[:2 + nd] + (k,))
        arg = flat.argmax(axis=-1)  # the first maximum gets the gradient, as in PyTorch
        out = xp.take_along_axis(flat, arg[..., None], axis=-1)[..., 0]
    else:  # average over the window, padding included (PyTorch's count_include_pad=True)
        out = win.mean(axis=tuple(range(2 + nd, 2 + 2 * nd)))

    def _backward(g):
        gxp = xp.zeros(ap.shape, dtype=a.dtype)
        for j, offset in enumerate(itertools.product(*(range(kk) for kk in kernel))):
            target = (slice(None), slice(None)) + tuple(
                slice(o, o + st * (n - 1) + 1, st) for o, st, n in zip(offset, stride, out_sp))
            gxp[target] += g * (arg == j) if kind == "max" else g / k
        return (_unpad(gxp, padding),)
    return Tensor._make(xp.ascontiguousarray(out), (x,), _backward, fn)


def max_pool1d(x: Tensor, kernel_size, stride=None, padding=0) -> Tensor:
    return _pool(x, 1, kernel_size, stride, padding, "max")


def max_pool2d(x: Tensor, kernel_size, stride=None, padding=0) -> Tensor:
    return _pool(x, 2, kernel_size, stride, padding, "max")


def avg_pool1d(x: Tensor, kernel_size, stride=None, padding=0) -> Tensor:
    return _pool(x, 1, kernel_size, stride, padding, "avg")


def avg_pool2d(x: Tensor, kernel_size, stride=None, padding=0) -> Tensor:
    return _pool(x, 2, kernel_size, stride, padding, "avg")


# --------------------------------------------------------------------------- normalization, dropout, embedding

def layer_norm(x: Tensor, normalized_shape, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """Normalize over the last len(normalized_shape) axes, then scale by weight and shift by bias."""
    shape = tuple(normalized_shape) if isinstance(normalized_shape, (tuple, list)) else (int(normalized_shape),)
    a = x.data
    xp = backend.array_module(a)
    if a.shape[a.ndim - len(shape):] != shape:
        raise ValueError(f"layer_norm: input of shape {a.shape} does not end in normalized_shape {shape}")
    axes = tuple(range(a.ndim - len(shape), a.ndim))
    lead = tuple(range(a.ndim - len(shape)))
    xhat = a - a.mean(axis=axes, keepdims=True)  # centred, then scaled in place
    var = (xhat * xhat).mean(axis=axes, keepdims=True)
    var += a.dtype.type(eps)
    rstd = xp.sqrt(var, out=var)
    xp.divide(a.dtype.type(1.0), rstd, out=rstd)
    xhat *= rstd
    out = xhat * weight.data if weight is not None else xhat.copy()
    if bias is not None:
        out += bias.data
    m = math.prod(shape)

    def _backward(g):
        gw = gb = None
        if weight is not None and weight.requires_grad:
            gw = (g * xhat).sum(axis=lead)
        if bias is not None and bias.requires_grad:
            gb = g.sum(axis=lead)
        gx = None
        if x.requires_grad:
            gxhat = g * weight.data if weight is not None else g
            mean_g = gxhat.sum(axis=axes, keepdims=True) / m
            mean_gx = (gxhat * xhat).sum(axis=axes, keepdims=True) / m
            gx = gxhat - mean_g
            gx -= xhat * mean_gx
            gx *= rstd
        return (gx,) + ((gw,) if weight is not None else ()) + ((gb,) if bias is not None else ())
    parents = (x,) + ((weight,) if weight is not None else ()) + ((bias,) if bias is not None else ())
    return Tensor._make(out, parents, _backward, "layer_norm")


def dropout(x: Tensor, p: float = 0.5, training: bool = True, key: int = 0) -> Tensor:
    """Zero each element with probability p and scale the rest by 1 / (1 - p) (inverted dropout).

    The mask comes from nn.random: inside the trainer a pure function of (seed, step,
    the example's position in the global batch, `key`), so N workers and a replayed
    step draw exactly the masks one process would.
    """
    if not 0 <= p < 1:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if not training or p == 0:
        return x
    a = x.data
    xp = backend.array_module(a)
    if a.ndim == 0:
        raise ValueError("dropout: needs a batch axis, got a 0-d tensor")
    keep = nn_random.uniform(xp, a.shape, a.dtype, key) >= p
    scale = keep * a.dtype.type(1.0 / (1.0 - p))
    return Tensor._make(a * scale, (x,), lambda g: (g * scale,), "dropout")


def embedding(indices, weight: Tensor) -> Tensor:
    """Rows of weight (num_embeddings, dim) picked by integer indices of any shape -> (*shape, dim).

    Float arrays that hold whole numbers are accepted (datasets keep one dtype)."""
    idx = indices.data if isinstance(indices, Tensor) else indices
    w = weight.data
    xp = backend.array_module(w)
    idx = xp.asarray(idx)
    if idx.dtype.kind not in "iu":
        as_int = idx.astype(np.int64)
        if idx.size and not bool(xp.all(as_int == idx)):
            raise ValueError("embedding: indices must be whole numbers")
        idx = as_int
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= w.shape[0]):
        raise ValueError(f"embedding: indices must lie in [0, {w.shape[0]}), got range "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    flat = idx.reshape(-1)

    def _backward(g):
        dest = claim_grad(weight, zeros=True)  # the rows add up into it
        grad = xp.zeros_like(w) if dest is None else dest
        backend.scatter_add(grad, flat, g.reshape(-1, w.shape[1]))
        return (None if dest is not None else grad,)
    return Tensor._make(w[idx], (weight,), _backward, "embedding")


# --------------------------------------------------------------------------- GELU and attention

def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """x * Phi(x); approximate="tanh" uses the tanh form (as PyTorch's GELU(approximate="tanh"))."""
    a = x.data
    xp = backend.array_module(a)
    dt = a.dtype.type
    if approximate == "none":
        cdf = backend.erf(a * dt(1 / math.sqrt(2)))
        cdf += dt(1.0)
        cdf *= dt(0.5)
        out = a * cdf

        def _backward(g):  # g * (cdf + a * pdf), pdf = exp(-a^2 / 2) / sqrt(2 pi), in one buffer
            d = a * a
            d *= dt(-0.5)
            xp.exp(d, out=d)
            d *= dt(1 / math.sqrt(2 * math.pi))
            d *= a
            d += cdf
            d *= g
            return (d,)
    elif approximate == "tanh":
        c = dt(math.sqrt(2 / math.pi))
        t = xp.tanh(c * (a + dt(0.044715) * a * a * a))
        out = dt(0.5) * a * (dt(1.0) + t)

        def _backward(g):
            dt_dx = (dt(1.0) - t * t) * c * (dt(1.0) + dt(3 * 0.044715) * a * a)
            return (g * (dt(0.5) * (dt(1.0) + t) + dt(0.5) * a * dt_dx),)
    else:
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return Tensor._make(out, (x,), _backward, "gelu")


def _product_into(dest, a, b) -> None:
    """dest[...] = a @ b for a strided view `dest`: numpy's matmul writes it in place; cupy's
    documentation promises no such out, so there the product is assigned."""
    if backend.array_module(dest) is np:
        np.matmul(a, b, out=dest)
    else:
        dest[...] = a @ b


_MASKS: dict = {}


def _causal_mask(xp, t: int, dtype):
    """(T, T): 0 where position i may see j <= i, -inf above the diagonal. One mask per array
    module and dtype, of the longest T asked for: a shorter T's is its top-left corner (so
    sampling token by token, T = 1, 2, ..., keeps one mask, not one per length)."""
    key = (xp.__name__, np.dtype(dtype).str)
    mask = _MASKS.get(key)
    if mask is None or mask.shape[0] < t:
        mask = xp.where(xp.triu(xp.ones((t, t), dtype=bool), k=1), dtype.type(-np.inf), dtype.type(0))
        _MASKS[key] = mask
    return mask[:t, :t]


def self_attention(qkv: Tensor, num_heads: int, causal: bool = True, dropout_p: float = 0.0,
                   training: bool = True, key: int = 0) -> Tensor:
    """Multi-head scaled dot-product self-attention on packed projections.

    qkv (batch, T, 3 * E) holds the queries, keys and values side by side (as
    `in_proj` makes them); each of `num_heads` heads attends over E / num_heads
    features; with `causal` position t sees positions <= t only. Returns (batch, T, E),
    the heads' outputs side by side. With `dropout_p` (in training) the attention weights
    are dropped as nanoGPT's attn_dropout does, masks from nn.random under `key` as
    `dropout`'s. One node: its backward is the standard one through
    dropout(softmax(Q K^T / sqrt(d))) V.
    """
    if not 0 <= dropout_p < 1:
        raise ValueError(f"self_attention: dropout_p must be in [0, 1), got {dropout_p}")
    a = qkv.data
    xp = backend.array_module(a)
    if a.ndim != 3 or a.shape[2] % (3 * num_heads):
        raise ValueError(f"self_attention: packed projections must be (batch, T, 3 * E) with E divisible by "
                         f"{num_heads} heads, got shape {a.shape}")
    b, t, e3 = a.shape
    e = e3 // 3
    d = e // num_heads
    heads = a.reshape(b, t, 3, num_heads, d).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, d)
    q, k, v = heads[0], heads[1], heads[2]
    scale = a.dtype.type(1.0 / math.sqrt(d))
    scores = q @ k.swapaxes(-1, -2)  # (B, H, T, T), then softmax(scores * scale) in place
    scores *= scale
    if causal:
        scores += _causal_mask(xp, t, a.dtype)
    scores -= scores.max(axis=-1, keepdims=True)
    p = xp.exp(scores, out=scores)
    p /= p.sum(axis=-1, keepdims=True)
    kept = None  # the dropped weights' mask, scaled by 1 / (1 - dropout_p)
    if training and dropout_p > 0:
        kept = (nn_random.uniform(xp, p.shape, a.dtype, key) >= dropout_p) * a.dtype.type(1.0 / (1.0 - dropout_p))
    out = ((p if kept is None else p * kept) @ v).transpose(0, 2, 1, 3).reshape(b, t, e)

    def _backward(g):
        go = g.reshape(b, t, num_heads, d).transpose(0, 2, 1, 3)  # (B, H, T, d)
        grad = xp.empty((b, t, 3, num_heads, d), dtype=a.dtype)  # qkv's layout; heads as views of it
        gq, gk, gv = (grad[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        _product_into(gv, (p if kept is None else p * kept).swapaxes(-1, -2), go)
        gs = go @ v.swapaxes(-1, -2)  # d loss / d p, then d loss / d scores in place
        if kept is not None:
            gs *= kept
        gs -= (gs * p).sum(axis=-1, keepdims=True)
        gs *= p
        gs *= scale
        _product_into(gq, gs, k)
        _product_into(gk, gs.swapaxes(-1, -2), q)
        return (grad.reshape(b, t, e3),)
    return Tensor._make(out, (qkv,), _backward, "self_attention")
