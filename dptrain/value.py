"""Value: the scalar autograd engine of the original notes (micrograd-style).

One number per node. It is slow (a Python object per scalar) and kept small on
purpose: it shows the algorithm in its plainest form, and the tests use it as an
independent oracle for the Tensor engine.
"""

from __future__ import annotations

import math


class Value:
    __slots__ = ("data", "grad", "_parents", "_backward", "_op")

    def __init__(self, data: float, _parents: tuple = (), _op: str = ""):
        self.data = float(data)
        self.grad = 0.0
        self._parents = _parents
        self._backward = None  # maps d(out) to one local gradient contribution per parent
        self._op = _op

    @staticmethod
    def _lift(x) -> "Value":
        return x if isinstance(x, Value) else Value(x)

    def __add__(self, other):
        other = Value._lift(other)
        out = Value(self.data + other.data, (self, other), "+")
        out._backward = lambda g: (g, g)
        return out

    def __mul__(self, other):
        other = Value._lift(other)
        a, b = self.data, other.data
        out = Value(a * b, (self, other), "*")
        out._backward = lambda g: (g * b, g * a)
        return out

    def __pow__(self, p):
        if not isinstance(p, (int, float)):
            raise TypeError(f"Value ** only takes an int or float exponent, got {type(p).__name__}")
        x = self.data
        out = Value(x ** p, (self,), f"**{p}")
        out._backward = lambda g: (g * p * x ** (p - 1),)
        return out

    def exp(self):
        e = math.exp(self.data)
        out = Value(e, (self,), "exp")
        out._backward = lambda g: (g * e,)
        return out

    def log(self):
        x = self.data
        out = Value(math.log(x), (self,), "log")
        out._backward = lambda g: (g / x,)
        return out

    def tanh(self):
        t = math.tanh(self.data)
        out = Value(t, (self,), "tanh")
        out._backward = lambda g: (g * (1 - t * t),)
        return out

    def relu(self):
        x = self.data
        out = Value(x if x > 0 else 0.0, (self,), "relu")
        out._backward = lambda g: (g if x > 0 else 0.0,)
        return out

    def sigmoid(self):
        x = self.data
        s = 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))
        out = Value(s, (self,), "sigmoid")
        out._backward = lambda g: (g * s * (1 - s),)
        return out

    def __neg__(self):
        return self * -1

    def __radd__(self, other):
        return self + other

    def __sub__(self, other):
        return self + (-Value._lift(other))

    def __rsub__(self, other):
        return Value._lift(other) + (-self)

    def __rmul__(self, other):
        return self * other

    def __truediv__(self, other):
        return self * Value._lift(other) ** -1

    def __rtruediv__(self, other):
        return Value._lift(other) * self ** -1

    def backward(self) -> None:
        """Fill `.grad` of every node this one depends on (d self / d node)."""
        order, visited = [], set()
        stack = [(self, False)]
        while stack:  # iterative post-order depth-first search: no recursion limit
            node, expanded = stack.pop()
            if expanded:
                order.append(node)
            elif id(node) not in visited:
                visited.add(id(node))
                stack.append((node, True))
                stack.extend((p, False) for p in reversed(node._parents) if id(p) not in visited)
        self.grad = 1.0
        for node in reversed(order):
            if node._backward is not None:
                for parent, g in zip(node._parents, node._backward(node.grad)):
                    parent.grad += g

    def __repr__(self) -> str:
        return f"Value(data={self.data:.6g}, grad={self.grad:.6g})"
