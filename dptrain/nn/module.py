"""Modules: Parameter, Module, Linear, MLP, Sequential and activation layers."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Iterator, Sequence

import numpy as np

from .. import backend
from ..tensor import Tensor, as_dtype
from . import functional as F
from . import init
from .flat import FlatBuffer, flatten


class Parameter(Tensor):
    """A leaf tensor that requires a gradient and that a Module registers."""

    __slots__ = ("_flat", "_flat_index")

    def __init__(self, data, dtype=None):
        super().__init__(data, requires_grad=True, dtype=dtype)
        self._flat = None
        self._flat_index = -1

    def _claim_grad(self, zeros: bool = False):
        """The engine's direct-write hook (tensor.claim_grad): our gradient's view of the flat
        buffer, once, while the buffer knows it to be zero (written as zeros first with `zeros`,
        if a lazy zero_grad left them unwritten)."""
        if self._flat is not None and self._flat.claim(self._flat_index):
            if zeros and self._flat.unsettled:
                self.grad[...] = 0
            return self.grad
        return None


class Module:
    """Base class: parameters and submodules are registered when assigned as attributes.

    `parameters()` lists them in one stable order (registration order, depth
    first); that order is the wire contract between workers and the parameter
    server, as it is for DDP's buckets.
    """

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__() "
                                 f"before assigning {name!r}")
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ------------------------------------------------------------------ parameters

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        seen = set()
        for name, p in self._named_parameters(prefix):
            if id(p) not in seen:  # a shared parameter is listed once
                seen.add(id(p))
                yield name, p

    def _named_parameters(self, prefix):
        for name, p in self._parameters.items():
            yield prefix + name, p
        for name, m in self._modules.items():
            yield from m._named_parameters(prefix + name + ".")

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    def modules(self) -> Iterator["Module"]:
        yield self
        for m in self._modules.values():
            yield from m.modules()

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        """(qualified name, module) for this module ("") and every submodule, depth first."""
        yield prefix.rstrip("."), self
        for name, m in self._modules.items():
            yield from m.named_modules(prefix + name + ".")

    def flat(self) -> FlatBuffer:
        """The model's flat buffer (made on first use): `.data` and `.grad` are 1-D arrays."""
        return flatten(self.parameters())

    def zero_grad(self) -> None:
        params = self.parameters()
        buf = getattr(params[0], "_flat", None) if params else None
        if buf is not None and all(p._flat is buf for p in params):
            buf.zero_grad()
            return
        for p in params:
            if p._flat is not None:
                p.grad.fill(0)
                p._flat.mark_written()  # only part of that buffer is zero
            else:
                p.grad = None

    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Name -> a numpy copy of the parameter, in the order modules hold them. A parameter
        shared by two modules (a tied embedding and output head) is listed under both names,
        as PyTorch does; it is one parameter (`parameters()` lists it once, the flat buffer
        stores it once)."""
        return OrderedDict((name, backend.to_numpy(p.data).copy()) for name, p in self._named_parameters(""))

    def load_state_dict(self, state: dict) -> None:
        """Copy values into the parameters in place (flat-buffer views stay valid).

        Every name must be known and every shape agree, and every parameter given (a shared
        one under any of its names; given under several, they must agree); nothing is changed
        otherwise.
        """
        names: dict = {}  # id of a parameter -> (the parameter, its names)
        for name, p in self._named_parameters(""):
            names.setdefault(id(p), (p, []))[1].append(name)
        known = {n for _, ns in names.values() for n in ns}
        missing = [ns[0] for _, ns in names.values() if not any(n in state for n in ns)]
        unexpected = [k for k in state if k not in known]
        if missing or unexpected:
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        source = {}
        for key, (p, ns) in names.items():
            given = [n for n in ns if n in state]
            for name in given:
                shape = tuple(np.shape(state[name]))
                if shape != p.shape:
                    raise ValueError(f"load_state_dict: {name!r} has shape {shape} in the state dict, "
                                     f"{p.shape} in the model")
            if any(not np.array_equal(np.asarray(state[n]), np.asarray(state[given[0]])) for n in given[1:]):
                raise ValueError(f"load_state_dict: {' and '.join(map(repr, given))} are one shared parameter "
                                 "but differ in the state dict")
            source[key] = given[0]
        for key, (p, _) in names.items():
            xp = backend.array_module(p.data)
            p.data[...] = xp.asarray(backend.to_device(np.asarray(state[source[key]]), p.device), dtype=p.data.dtype)

    def to(self, device: str) -> "Module":
        """Move every parameter to `device` ("cpu" or "cuda"), or cast it to a dtype ("float32",
        "float64"); the flat buffer is rebuilt on first use."""
        if device not in backend.DEVICES:
            dt = as_dtype(device)
            for p in self.parameters():
                p.data = p.data.astype(dt)
                p.grad = None if p.grad is None else p.grad.astype(dt)
                p._flat, p._flat_index = None, -1
            return self
        for p in self.parameters():
            p.data = backend.to_device(p.data, device)
            p.grad = None if p.grad is None else backend.to_device(p.grad, device)
            p._flat, p._flat_index = None, -1
        return self

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._modules.items())
        return f"{type(self).__name__}({inner})"


class Linear(Module):
    """y = x @ weight.T + bias, weight of shape (out_features, in_features).

    Initialised as torch.nn.Linear: U(-1/sqrt(in), 1/sqrt(in)) for both weight and bias.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype="float32",
                 rng: np.random.Generator | None = None):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Linear: feature sizes must be positive, got ({in_features}, {out_features})")
        dt = as_dtype(dtype)
        bound = 1.0 / math.sqrt(in_features)
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(init.uniform(rng, bound, (out_features, in_features), dt))
        self.bias = Parameter(init.uniform(rng, bound, (out_features,), dt)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def __repr__(self) -> str:
        return f"Linear({self.in_features}, {self.out_features}, bias={self.bias is not None})"


class ReLU(Module):
    def forward(self, x):
        return x.relu()


class Tanh(Module):
    def forward(self, x):
        return x.tanh()


class Sigmoid(Module):
    def forward(self, x):
        return x.sigmoid()


class Identity(Module):
    def forward(self, x):
        return x


ACTIVATIONS = {"relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid, "identity": Identity}


class Sequential(Module):
    """Modules applied in order; registered as "0", "1", ... like torch.nn.Sequential."""

    def __init__(self, *modules: Module):
        super().__init__()
        for i, m in enumerate(modules):
            if not isinstance(m, Module):
                raise TypeError(f"Sequential: item {i} is a {type(m).__name__}, not a Module")
            setattr(self, str(i), m)

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, i: int) -> Module:
        return list(self._modules.values())[i]

    def forward(self, x):
        for m in self._modules.values():
            x = m(x)
        return x


class MLP(Sequential):
    """Linear layers of sizes `dims` with `activation` between them (none after the last).

    `MLP([40, 256, 256, 10])` has three Linear layers. `seed` makes the
    initialisation reproducible: every replica built with the same seed is equal. Without
    it the layers draw from init's default generator, as every other layer does (so
    `--model mlp` is reproducible from the run's seed, like the other built-in models).
    Inputs of more than two axes (images, say) are flattened to (batch, features).
    """

    def __init__(self, dims: Sequence[int], activation: str = "relu", dtype="float32", seed: int | None = None):
        dims = [int(d) for d in dims]
        if len(dims) < 2 or any(d < 1 for d in dims):
            raise ValueError(f"MLP: dims must be at least two positive sizes, got {dims}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"MLP: unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
        rng = np.random.default_rng(seed) if seed is not None else None  # None: init's generator (manual_seed)
        layers: list[Module] = []
        for i, (n_in, n_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(Linear(n_in, n_out, dtype=dtype, rng=rng))
            if i < len(dims) - 2:
                layers.append(ACTIVATIONS[activation]())
        super().__init__(*layers)
        self.dims = dims

    def forward(self, x):
        if x.ndim > 2:
            x = x.reshape(x.shape[0], -1)
        return super().forward(x)
