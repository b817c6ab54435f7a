"""Tensor: reverse-mode automatic differentiation over numpy (or cupy) arrays.

Each op computes its result and, when any input requires a gradient, records
its inputs (`_parents`, a tuple) and a closure `_backward(g)` that maps the
gradient of the output to one gradient per parent (None where a parent needs
none). `backward()` walks the graph in an iterative topological order from the
root, combines the local gradients by the chain rule, accumulates them into the
leaves' `.grad` and then frees the graph.

The closures capture arrays and input tensors, never their own output: a node
that refers to itself through its closure is a reference cycle, and cycles make
Python's cycle collector run inside the training loop.

Why one file of about 600 lines: every op's forward sits with its backward (the
rule a reader checks against the math), and the ops share the Tensor class they
are methods of; split by op kind, a reader would chase one class across files.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import numpy as np

from . import backend

DEFAULT_DTYPE = np.float32
_DTYPES = {"float32": np.float32, "float64": np.float64}
DTYPES = tuple(_DTYPES)  # the training dtypes, by name


def as_dtype(dtype) -> np.dtype:
    """np.float32 / np.float64 from a name or a numpy dtype; anything else is an error."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
        return np.dtype(_DTYPES[dtype])
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise ValueError(f"unsupported dtype {dt}: tensors are float32 or float64")
    return dt


# --------------------------------------------------------------------------- grad mode

_grad_enabled = True


@contextlib.contextmanager
def no_grad():
    """Inside this block ops record nothing: no parents, no closures, no gradients."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled() -> bool:
    return _grad_enabled


# --------------------------------------------------------------------------- helpers

def unbroadcast(g, shape):
    """Sum the gradient `g` back to `shape`, the adjoint of broadcasting.

    Broadcasting an operand of `shape` to the output's shape copies it along
    the new leading axes and along the axes where `shape` has size 1; the
    gradient of a copy is the sum of the copies' gradients, so we sum over
    exactly those axes.
    """
    if g.shape == shape:
        return g
    extra = g.ndim - len(shape)
    if extra:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g


def _freed_graph(g):
    raise RuntimeError("backward through a graph that was already freed: "
                       "call backward(retain_graph=True) the first time to backpropagate twice")


def _normalize_axis(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for a tensor of {ndim} dimensions")
        out.append(a % ndim)
    return tuple(out)


def _expand_reduced(g, shape, axes, keepdims):
    """Give a reduced gradient back the reduced axes (size 1) so it broadcasts to `shape`."""
    if not keepdims:
        g = g.reshape([1 if i in axes else n for i, n in enumerate(shape)])
    return g


# --------------------------------------------------------------------------- Tensor

class Tensor:
    """An array with an optional gradient and the op that made it.

    `Tensor(data, requires_grad=False, dtype=None)`: floating arrays keep their
    dtype (as torch.from_numpy does), anything else (lists, scalars, integer
    arrays) becomes float32 unless `dtype` says "float64". numpy and cupy arrays
    are both accepted; the tensor lives where its array lives.
    """

    __slots__ = ("data", "grad", "requires_grad", "_parents", "_backward", "_op", "__weakref__")
    __array_priority__ = 1000  # numpy scalars and arrays defer to our operators

    def _claim_grad(self, zeros: bool = False):
        """The hook behind `claim_grad`: this tensor's gradient array if it is known to be zero and
        an op may write its gradient straight into it (once), else None. Subclasses that store
        gradients elsewhere (nn.Parameter) override it."""
        return None

    def __init__(self, data, requires_grad: bool = False, dtype=None):
        if isinstance(data, Tensor):
            data = data.data
        xp = backend.array_module(data)
        if dtype is not None:
            data = xp.asarray(data, dtype=as_dtype(dtype))
        else:
            keep = isinstance(data, xp.ndarray) and data.dtype in (np.float32, np.float64)
            data = xp.asarray(data) if keep else xp.asarray(data, dtype=DEFAULT_DTYPE)
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._parents: tuple = ()
        self._backward = None
        self._op = ""

    @classmethod
    def _make(cls, data, parents: tuple, backward, op: str) -> "Tensor":
        """The result of an op: records the graph only when something needs a gradient."""
        out = cls.__new__(cls)
        out.data = data
        out.grad = None
        out._op = op
        if _grad_enabled and any(p.requires_grad for p in parents):
            out.requires_grad = True
            out._parents = parents
            out._backward = backward
        else:
            out.requires_grad = False
            out._parents = ()
            out._backward = None
        return out

    def _lift(self, other) -> "Tensor":
        """A constant operand (scalar or array) as a tensor of our dtype on our device."""
        if isinstance(other, Tensor):
            return other
        xp = backend.array_module(self.data)
        return Tensor(xp.asarray(other, dtype=self.data.dtype))

    # ------------------------------------------------------------------ properties

    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def device(self) -> str:
        return backend.device_of(self.data)

    @property
    def is_leaf(self) -> bool:
        return self._backward is None

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        op = f", op={self._op}" if self._op else ""
        return f"Tensor({self.data!r}{grad}{op})"

    def numpy(self) -> np.ndarray:
        """The data as a numpy array (copied from the GPU when needed)."""
        return backend.to_numpy(self.data)

    def item(self) -> float:
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return float(self.data.reshape(()))

    def detach(self) -> "Tensor":
        """The same data, cut off from the graph."""
        return Tensor(self.data)

    def to(self, device: str) -> "Tensor":
        """A copy on `device` ("cpu" or "cuda"); the tensor itself when already there."""
        if backend.device_of(self.data) == device:
            return self
        return Tensor(backend.to_device(self.data, device), requires_grad=self.requires_grad)

    # ------------------------------------------------------------------ elementwise

    def __add__(self, other):
        other = self._lift(other)
        a_shape, b_shape = self.shape, other.shape

        def _backward(g):
            return unbroadcast(g, a_shape), unbroadcast(g, b_shape)
        return Tensor._make(self.data + other.data, (self, other), _backward, "add")

    def __sub__(self, other):
        other = self._lift(other)
        a_shape, b_shape = self.shape, other.shape

        def _backward(g):
            return unbroadcast(g, a_shape), unbroadcast(-g, b_shape)
        return Tensor._make(self.data - other.data, (self, other), _backward, "sub")

    def __mul__(self, other):
        other = self._lift(other)
        a, b = self.data, other.data
        a_grad, b_grad = self.requires_grad, other.requires_grad

        def _backward(g):
            return (unbroadcast(g * b, a.shape) if a_grad else None,
                    unbroadcast(g * a, b.shape) if b_grad else None)
        return Tensor._make(a * b, (self, other), _backward, "mul")

    def __truediv__(self, other):
        other = self._lift(other)
        a, b = self.data, other.data
        a_grad, b_grad = self.requires_grad, other.requires_grad

        def _backward(g):
            return (unbroadcast(g / b, a.shape) if a_grad else None,
                    unbroadcast(-g * a / (b * b), b.shape) if b_grad else None)
        return Tensor._make(a / b, (self, other), _backward, "div")

    def __radd__(self, other):
        return self._lift(other) + self

    def __rsub__(self, other):
        return self._lift(other) - self

    def __rmul__(self, other):
        return self._lift(other) * self

    def __rtruediv__(self, other):
        return self._lift(other) / self

    def __neg__(self):
        return Tensor._make(-self.data, (self,), lambda g: (-g,), "neg")

    def __pow__(self, exponent):
        if isinstance(exponent, Tensor) or not np.isscalar(exponent):
            raise TypeError(f"pow: the exponent must be a Python or numpy scalar, got {type(exponent).__name__}")
        x = self.data
        p = x.dtype.type(exponent)

        def _backward(g):
            return (g * p * x ** (p - 1),)
        return Tensor._make(x ** p, (self,), _backward, "pow")

    def exp(self):
        out = backend.array_module(self.data).exp(self.data)
        return Tensor._make(out, (self,), lambda g: (g * out,), "exp")

    def log(self):
        x = self.data
        return Tensor._make(backend.array_module(x).log(x), (self,), lambda g: (g / x,), "log")

    def tanh(self):
        out = backend.array_module(self.data).tanh(self.data)
        return Tensor._make(out, (self,), lambda g: (g * (1 - out * out),), "tanh")

    def sigmoid(self):
        xp = backend.array_module(self.data)
        x = self.data
        # exp of a non-positive number only: no overflow for large |x|
        e = xp.exp(-xp.abs(x))
        out = xp.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)
        return Tensor._make(out, (self,), lambda g: (g * out * (1 - out),), "sigmoid")

    def relu(self):
        x = self.data
        out = backend.array_module(x).maximum(x, 0)
        return Tensor._make(out, (self,), lambda g: (g * (x > 0),), "relu")

    # ------------------------------------------------------------------ matmul

    def __matmul__(self, other):
        other = self._lift(other)
        a, b = self.data, other.data
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError(f"matmul: operands must have at least one dimension, got shapes {a.shape} and {b.shape}")
        k_a = a.shape[-1]
        k_b = b.shape[-2] if b.ndim >= 2 else b.shape[0]
        if k_a != k_b:
            raise ValueError(f"matmul: shapes {a.shape} and {b.shape} are not aligned ({k_a} != {k_b})")
        a_grad, b_grad = self.requires_grad, other.requires_grad

        def _backward(g):
            # promote 1-D operands to matrices, as matmul itself does
            a2 = a[None, :] if a.ndim == 1 else a
            b2 = b[:, None] if b.ndim == 1 else b
            g2 = g
            if b.ndim == 1:
                g2 = g2[..., None]
            if a.ndim == 1:
                g2 = g2[..., None, :]
            ga = gb = None
            if a_grad:
                ga = unbroadcast(g2 @ b2.swapaxes(-1, -2), a2.shape).reshape(a.shape)
            if b_grad:
                gb = unbroadcast(a2.swapaxes(-1, -2) @ g2, b2.shape).reshape(b.shape)
            return ga, gb
        return Tensor._make(a @ b, (self, other), _backward, "matmul")

    def __rmatmul__(self, other):
        return self._lift(other) @ self

    # ------------------------------------------------------------------ reductions

    def sum(self, axis=None, keepdims: bool = False):
        shape = self.shape
        axes = _normalize_axis(axis, self.ndim)
        xp = backend.array_module(self.data)

        def _backward(g):
            return (xp.broadcast_to(_expand_reduced(g, shape, axes, keepdims), shape),)
        return Tensor._make(self.data.sum(axis=axes, keepdims=keepdims), (self,), _backward, "sum")

    def mean(self, axis=None, keepdims: bool = False):
        shape = self.shape
        axes = _normalize_axis(axis, self.ndim)
        count = 1
        for a in axes:
            count *= shape[a]
        xp = backend.array_module(self.data)
        scale = self.data.dtype.type(1.0 / max(count, 1))

        def _backward(g):
            return (xp.broadcast_to(_expand_reduced(g * scale, shape, axes, keepdims), shape),)
        return Tensor._make(self.data.mean(axis=axes, keepdims=keepdims), (self,), _backward, "mean")

    def max(self, axis=None, keepdims: bool = False):
        """Maximum over axes; the gradient is shared equally among tied maxima."""
        x = self.data
        axes = _normalize_axis(axis, self.ndim)
        if x.size == 0:
            raise ValueError(f"max: empty tensor of shape {x.shape}")
        out = x.max(axis=axes, keepdims=keepdims)

        def _backward(g):
            m = _expand_reduced(out, x.shape, axes, keepdims)
            mask = (x == m).astype(x.dtype)
            mask /= mask.sum(axis=axes, keepdims=True)
            return (mask * _expand_reduced(g, x.shape, axes, keepdims),)
        return Tensor._make(out, (self,), _backward, "max")

    # ------------------------------------------------------------------ shape ops

    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        old = self.shape
        try:
            out = self.data.reshape(shape)
        except ValueError:
            raise ValueError(f"reshape: cannot reshape a tensor of shape {old} ({self.size} elements) "
                             f"into shape {shape}") from None
        return Tensor._make(out, (self,), lambda g: (g.reshape(old),), "reshape")

    def transpose(self, *axes):
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        if not axes:
            axes = tuple(reversed(range(self.ndim)))
        if sorted(a % max(self.ndim, 1) for a in axes) != list(range(self.ndim)):
            raise ValueError(f"transpose: axes {axes} are not a permutation of the {self.ndim} axes of shape {self.shape}")
        inverse = tuple(np.argsort([a % self.ndim for a in axes]))
        return Tensor._make(self.data.transpose(axes), (self,), lambda g: (g.transpose(inverse),), "transpose")

    @property
    def T(self):
        return self.transpose()

    def __getitem__(self, index):
        if isinstance(index, Tensor):
            index = index.data
        x = self.data
        xp = backend.array_module(x)
        try:
            out = x[index]
        except IndexError as e:
            raise IndexError(f"indexing a tensor of shape {x.shape}: {e}") from None
        repeats = _has_array_index(index)

        def _backward(g):
            grad = xp.zeros_like(x)
            if repeats:  # integer arrays may repeat an index: add, don't assign
                backend.scatter_add(grad, index, g)
            else:
                grad[index] = g
            return (grad,)
        return Tensor._make(out, (self,), _backward, "getitem")

    # ------------------------------------------------------------------ softmax family

    def log_softmax(self, axis: int = -1):
        """x - logsumexp(x), computed after subtracting the max (no overflow)."""
        x = self.data
        xp = backend.array_module(x)
        shifted = x - x.max(axis=axis, keepdims=True)
        out = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))

        def _backward(g):
            return (g - xp.exp(out) * g.sum(axis=axis, keepdims=True),)
        return Tensor._make(out, (self,), _backward, "log_softmax")

    def softmax(self, axis: int = -1):
        x = self.data
        xp = backend.array_module(x)
        e = xp.exp(x - x.max(axis=axis, keepdims=True))
        out = e / e.sum(axis=axis, keepdims=True)

        def _backward(g):
            return (out * (g - (g * out).sum(axis=axis, keepdims=True)),)
        return Tensor._make(out, (self,), _backward, "softmax")

    # ------------------------------------------------------------------ backward

    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Backpropagate from this tensor: fill `.grad` of every leaf that requires one.

        `grad` is the gradient of some scalar with respect to this tensor; it may be
        left out only when this tensor holds a single element (it is then 1).
        Gradients accumulate into `.grad`; the graph is freed afterwards unless
        `retain_graph` is true.
        """
        if not self.requires_grad:
            raise RuntimeError(f"backward: this tensor (shape {self.shape}, op {self._op or 'leaf'!r}) "
                               "does not require grad: nothing it depends on has requires_grad=True")
        xp = backend.array_module(self.data)
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward: a gradient can be left out only for a tensor with one "
                                   f"element, got shape {self.shape}; pass grad= of that shape")
            grad = xp.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=self.data.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"backward: grad has shape {grad.shape}, the tensor has shape {self.shape}")

        order = _topological_order(self)
        grads = {id(self): grad}
        for node in reversed(order):
            g = grads.pop(id(node), None)
            if g is None:
                continue
            if node._backward is None:
                _accumulate_leaf(node, g)
                continue
            for parent, pg in zip(node._parents, node._backward(g)):
                if pg is None or not parent.requires_grad:
                    continue
                key = id(parent)
                prev = grads.get(key)
                grads[key] = pg if prev is None else prev + pg
        if not retain_graph:
            for node in order:
                if node._backward is not None:
                    node._parents = ()
                    node._backward = _freed_graph

    # ------------------------------------------------------------------ comparisons (no grad)

    def argmax(self, axis=None):
        return self.data.argmax(axis=axis)


def _has_array_index(index) -> bool:
    """True when `index` holds integer arrays (or lists), which may select an element twice."""
    items = index if isinstance(index, tuple) else (index,)
    for item in items:
        if item is None or item is Ellipsis or isinstance(item, (slice, int, np.integer, bool)):
            continue
        dtype = getattr(item, "dtype", None)
        if dtype is None:
            dtype = np.asarray(item).dtype
        if dtype != np.bool_:  # a boolean mask selects each element at most once
            return True
    return False


def _topological_order(root: Tensor) -> list:
    """Nodes that lead to `root` and need a gradient, each after all of its parents.

    Iterative depth-first search (no recursion limit); parents are visited in their
    tuple order, so the order is the same on every run.
    """
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        for parent in reversed(node._parents):
            if parent.requires_grad and id(parent) not in visited:
                stack.append((parent, False))
    return order


def claim_grad(leaf: Tensor, zeros: bool = False):
    """The gradient array of a leaf whose gradient is known to be zero, or None.

    An op's backward may write its gradient for `leaf` straight into the returned
    array (matmul's `out=`) and return None for that parent, instead of returning
    a new array that backward() would then add to zeros. Where gradients are stored
    is not the engine's business: the leaf's `_claim_grad` hook answers (a plain
    tensor never claims; nn's Parameter asks its flat buffer, and clears the zero
    mark, so a second use of the same parameter accumulates as usual).

    The claimer overwrites the whole array: it may hold anything (a lazy
    FlatBuffer.zero_grad marks gradients zero without writing the zeros). With
    `zeros`, it is zero-filled first, for an op that adds into it (embedding's
    scatter-add).
    """
    return leaf._claim_grad(zeros) if DIRECT_GRAD_WRITES else None


DIRECT_GRAD_WRITES = True  # False makes every gradient go through `+=` (tests compare the two paths)


def _accumulate_leaf(leaf: Tensor, g) -> None:
    if g.shape != leaf.data.shape:  # a broadcast_to view from a reduction, say
        g = backend.array_module(g).broadcast_to(g, leaf.data.shape)
    if leaf.grad is None:
        leaf.grad = g.astype(leaf.data.dtype, copy=True)  # own it: g may be shared with other nodes
        return
    dest = claim_grad(leaf)
    if dest is not None:
        dest[...] = g
    else:
        leaf.grad += g  # in place: a parameter's grad is a view into the flat gradient buffer


# --------------------------------------------------------------------------- functions

def tensor(data, requires_grad: bool = False, dtype=None) -> Tensor:
    return Tensor(data, requires_grad=requires_grad, dtype=dtype)


def concatenate(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    tensors = list(tensors)
    if not tensors:
        raise ValueError("concatenate: needs at least one tensor")
    first = tensors[0]
    tensors = [first._lift(t) for t in tensors]
    xp = backend.array_module(first.data)
    try:
        out = xp.concatenate([t.data for t in tensors], axis=axis)
    except ValueError as e:
        shapes = [t.shape for t in tensors]
        raise ValueError(f"concatenate: shapes {shapes} do not fit along axis {axis}: {e}") from None
    splits = np.cumsum([t.shape[axis] for t in tensors])[:-1].tolist()

    def _backward(g):
        return tuple(xp.split(g, splits, axis=axis))
    return Tensor._make(out, tuple(tensors), _backward, "concatenate")

