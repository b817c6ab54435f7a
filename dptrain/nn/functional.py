"""Stateless layers and losses. `linear` and `cross_entropy` are single fused graph nodes."""

from __future__ import annotations

from .. import backend
from ..tensor import Tensor, claim_grad

REDUCTIONS = ("mean", "sum")


def _check_reduction(reduction: str, fn: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: unknown reduction {reduction!r}; expected one of {REDUCTIONS}")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T + bias for x of shape (batch, in) and weight of shape (out, in)."""
    x = weight._lift(x)
    a, w = x.data, weight.data
    if a.ndim != 2 or w.ndim != 2 or a.shape[1] != w.shape[1]:
        raise ValueError(f"linear: input of shape {a.shape} does not fit weight of shape {w.shape} "
                         f"(expected (batch, {w.shape[1] if w.ndim == 2 else '?'}))")
    out = a @ w.T
    if bias is not None:
        out += bias.data
    x_grad, w_grad = x.requires_grad, weight.requires_grad

    def _backward(g):
        gx = g @ w if x_grad else None
        gw = gb = None
        if w_grad:  # straight into the flat gradient buffer when possible (see claim_grad)
            dest = claim_grad(weight)
            if dest is None:
                gw = g.T @ a
            else:
                backend.array_module(g).matmul(g.T, a, out=dest)
        if bias is not None and bias.requires_grad:
            dest = claim_grad(bias)
            if dest is None:
                gb = g.sum(axis=0)
            else:
                g.sum(axis=0, out=dest)
        return gx, gw, gb
    parents = (x, weight) if bias is None else (x, weight, bias)
    return Tensor._make(out, parents, _backward, "linear")


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
    """Softmax cross-entropy of (batch, classes) logits against integer class labels.

    Fused: one node computes the stable log-softmax and picks the labels' entries;
    its backward is (softmax - one_hot) times the incoming gradient.
    """
    _check_reduction(reduction, "cross_entropy")
    z = logits.data
    xp = backend.array_module(z)
    y = target.data if isinstance(target, Tensor) else target
    y = xp.asarray(y)
    if z.ndim != 2:
        raise ValueError(f"cross_entropy: logits must be (batch, classes), got shape {z.shape}")
    if y.shape != (z.shape[0],):
        raise ValueError(f"cross_entropy: labels of shape {y.shape} do not match logits of shape {z.shape}")
    if y.dtype.kind not in "iu":
        if y.size and not bool(xp.all(y == xp.round(y))):
            raise ValueError("cross_entropy: labels must be integer class indices")
        y = y.astype(xp.int64)
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
    out = (total * scale).astype(z.dtype)

    def _backward(g):
        grad = xp.exp(shifted - logsumexp)  # softmax
        grad[rows, y] -= 1
        grad *= g * z.dtype.type(scale)
        return (grad,)
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
