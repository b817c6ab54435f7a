"""Models and losses: the built-ins, user code named by `--model` and `--loss`, and the
factory every replica calls.

A model is given as
- layer widths, `[40, 256, 256, 10]` or "40,256,256,10" (an MLP, as before),
- a built-in name: "mlp", "cnn1d", "cnn2d", "transformer",
- a reference "path/to/file.py:function" or "package.module:function",
- or, from Python, any callable that returns a `dp.nn.Module`.

A builder may take no arguments, or the dataset's `input_shape` and `num_outputs`
(by those names, or as two positional arguments). A loss is "cross_entropy", "mse",
a reference, or a callable `(output, target) -> Tensor` returning the SUM of the
per-example losses over the examples it is given: the step contract divides once,
where gradients meet, so that N workers equal one process.

Why one file of about 440 lines: the built-ins, references, the factory and the check
before a run are the one answer to "what does --model / --loss mean"; the layers they
use live in nn/.

`ModelFactory` is what travels to the server and every worker: called, it seeds
`nn.init`'s generator with the run's seed, calls the builder, casts to the run's
dtype and device, and keys each dropout layer by its name. The server's parameters
are the initial ones; replicas need the same parameter names and shapes, not the
same values. `check(...)` runs the model and the loss once on two examples before
anything starts, so mistakes are one clear line, not a worker's traceback.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np

from .config import ConfigError, TrainConfig, is_widths
from .nn import (MLP, Conv1d, Conv2d, Dropout, Embedding, Flatten, LayerNorm, Linear, MaxPool2d, Module, ReLU,
                 Sequential, TransformerBlock, functional as F, init, random as nn_random)
from .tensor import Tensor, as_dtype

# --------------------------------------------------------------------------- built-in models


class ConvBase(Module):
    """The MNIST-1D paper's CNN (Greydanus 2020, `ConvBase`): three Conv1d layers of `channels`
    (kernel 5, then 3 and 3; stride 2, padding 1), ReLU after each, and a linear layer from
    the flattened features to the classes. (n, length) inputs are read as one channel."""

    def __init__(self, length: int, num_outputs: int, channels: int = 25, in_channels: int = 1):
        super().__init__()
        self.conv1 = Conv1d(in_channels, channels, 5, stride=2, padding=1)
        self.conv2 = Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = Conv1d(channels, channels, 3, stride=2, padding=1)
        out = length
        for k in (5, 3, 3):
            out = (out + 2 - k) // 2 + 1
        if out < 1:
            raise ValueError(f"cnn1d: inputs of length {length} are too short for three stride-2 convolutions")
        self.linear = Linear(channels * out, num_outputs)

    def forward(self, x):
        if x.ndim == 2:
            x = x.reshape(x.shape[0], 1, x.shape[1])
        h = self.conv3(self.conv2(self.conv1(x).relu()).relu()).relu()
        return self.linear(h.reshape(h.shape[0], -1))


class SmallCNN(Sequential):
    """Two 3x3 convolutions (32 and 64 channels, padding 1) each followed by ReLU and 2x2 max
    pooling, then a hidden linear layer of 128 and the classes: for 8x8 digits and other
    small images of shape (channels, height, width)."""

    def __init__(self, input_shape, num_outputs: int, channels=(32, 64), hidden: int = 128):
        c, h, w = input_shape
        if h < 4 or w < 4:
            raise ValueError(f"cnn2d: images of {h}x{w} are too small for two 2x2 poolings")
        c1, c2 = channels
        super().__init__(Conv2d(c, c1, 3, padding=1), ReLU(), MaxPool2d(2),
                         Conv2d(c1, c2, 3, padding=1), ReLU(), MaxPool2d(2),
                         Flatten(), Linear(c2 * (h // 4) * (w // 4), hidden), ReLU(), Linear(hidden, num_outputs))


class TinyTransformer(Module):
    """A small causal transformer for token sequences: token and position embeddings, `layers`
    pre-norm blocks, a final LayerNorm and a linear head to the vocabulary. Inputs (batch, T)
    of token ids, outputs (batch, T, vocab): logits for the next token at every position."""

    def __init__(self, vocab: int, block: int, d_model: int = 64, nhead: int = 4, layers: int = 2,
                 dropout: float = 0.0):
        super().__init__()
        self.block = block
        self.tok_emb = Embedding(vocab, d_model)
        self.pos_emb = Embedding(block, d_model)
        self.blocks = Sequential(*[TransformerBlock(d_model, nhead, dropout=dropout) for _ in range(layers)])
        self.norm = LayerNorm(d_model)
        self.head = Linear(d_model, vocab)

    name = "transformer"  # in its errors

    def forward(self, idx):
        t = idx.shape[1]
        if t > self.block:
            raise ValueError(f"{self.name}: sequences of {t} tokens, the model was built for {self.block}")
        return self.head(self.norm(self.blocks(self._embed(idx, t))))

    def _embed(self, idx, t: int):
        return self.tok_emb(idx) + self.pos_emb(np.arange(t))


class GPT(TinyTransformer):
    """nanoGPT's model: token and position embeddings, `n_layer` pre-norm blocks of causal
    self-attention and a 4x GELU MLP, a final LayerNorm, no biases, and the head tied to the
    token embedding (one parameter, listed under both names). GPT-2's initialisation: every
    matrix N(0, 0.02), the residual projections (attention's out_proj, the MLP's linear2)
    N(0, 0.02 / sqrt(2 n_layer)), norms at one. Inputs (batch, T <= block) of token ids,
    outputs (batch, T, vocab). TinyTransformer's forward, with dropout after the embeddings
    (the blocks drop attention weights and residual outputs: nanoGPT's attn and resid dropout)."""

    name = "gpt"

    def __init__(self, vocab: int, block: int, n_layer: int = 4, n_head: int = 4, n_embd: int = 128,
                 dropout: float = 0.0):
        Module.__init__(self)  # its own layers, not TinyTransformer's
        self.block = block
        self.tok_emb = Embedding(vocab, n_embd)
        self.pos_emb = Embedding(block, n_embd)
        self.drop = Dropout(dropout)
        self.blocks = Sequential(*[TransformerBlock(n_embd, n_head, dropout=dropout, bias=False)
                                   for _ in range(n_layer)])
        self.norm = LayerNorm(n_embd, bias=False)
        self.head = Linear(n_embd, vocab, bias=False)
        self.head.weight = self.tok_emb.weight  # tied: the output head reads the token embedding
        rng = init.default_generator()
        residual = 0.02 / math.sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if p.data.ndim >= 2 and name != "head.weight":
                std = residual if name.endswith(("out_proj.weight", "linear2.weight")) else 0.02
                p.data[...] = rng.normal(0.0, std, p.data.shape)

    def _embed(self, idx, t: int):
        return self.drop(super()._embed(idx, t))


def gpt(input_shape, num_outputs, n_layer: int = 4, n_head: int = 4, n_embd: int = 128, dropout: float = 0.0):
    """nanoGPT's architecture (GPT) over (positions,) token sequences; --n-layer, --n-head, --n-embd
    and --dropout size it."""
    _needs(input_shape, 1, "gpt", "(positions,) of token ids")
    return GPT(num_outputs, input_shape[0], n_layer, n_head, n_embd, dropout)


def _needs(shape, ndim: int, name: str, what: str):
    if len(shape) != ndim:
        raise ValueError(f"{name}: needs inputs of shape {what} per example, the data has {tuple(shape)}")


def mlp(input_shape, num_outputs):
    """Two hidden layers of 256 with ReLU (inputs of any shape are flattened)."""
    return MLP([int(np.prod(input_shape)), 256, 256, num_outputs])


def cnn1d(input_shape, num_outputs):
    """The MNIST-1D paper's ConvBase, for (length,) or (channels, length) inputs."""
    if len(input_shape) not in (1, 2):
        raise ValueError(f"cnn1d: needs inputs of shape (length,) or (channels, length), the data has "
                         f"{tuple(input_shape)}")
    return ConvBase(input_shape[-1], num_outputs, in_channels=1 if len(input_shape) == 1 else input_shape[0])


def cnn2d(input_shape, num_outputs):
    """SmallCNN, for (channels, height, width) images (the 8x8 digits: --dataset digits2d)."""
    _needs(input_shape, 3, "cnn2d", "(channels, height, width)")
    return SmallCNN(input_shape, num_outputs)


def transformer(input_shape, num_outputs):
    """TinyTransformer (d_model 64, 4 heads, 2 blocks) over (positions,) token sequences."""
    _needs(input_shape, 1, "transformer", "(positions,) of token ids")
    return TinyTransformer(num_outputs, input_shape[0])


BUILTIN_MODELS = {"mlp": mlp, "cnn1d": cnn1d, "cnn2d": cnn2d, "transformer": transformer, "gpt": gpt}


# --------------------------------------------------------------------------- losses

def cross_entropy_sum(output: Tensor, target) -> Tensor:
    """Softmax cross-entropy, summed over examples. For sequence outputs (batch, positions,
    classes) an example's loss is the mean over its positions: the reported loss is then
    per token, and the sum over examples keeps the step contract."""
    loss = F.cross_entropy(output, target, reduction="sum")
    positions = math.prod(output.shape[1:-1])
    return loss / positions if positions > 1 else loss


def mse_sum(output: Tensor, target) -> Tensor:
    """Squared error, summed over examples and outputs."""
    return F.mse_loss(output, target, reduction="sum")


BUILTIN_LOSSES = {"cross_entropy": cross_entropy_sum, "mse": mse_sum}


def count_correct(output, target) -> float:
    """Examples classified right; an example with several positions counts the fraction it got
    right. 0 when the output does not have the labels' shape plus a class axis."""
    if output.ndim < 2 or output.shape[:-1] != tuple(target.shape):
        return 0
    hits = output.argmax(axis=-1) == target
    if hits.ndim == 1:
        return int(hits.sum())
    return float(hits.reshape(len(hits), -1).mean(axis=1).sum())


# --------------------------------------------------------------------------- references

def load_reference(text: str, what: str):
    """The callable named by "path/to/file.py:function" or "package.module:function".

    A file is loaded as a module of its own (named after its path), once per process.
    Raises ConfigError naming `what` ("model" or "loss") and the problem.
    """
    where, sep, name = text.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ConfigError(f"invalid {what}: {text!r} (expected path/to/file.py:function or package.module:function)",
                          field=what)
    if where.endswith(".py") or os.sep in where or "/" in where:
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"invalid {what}: {text!r}: file {where} not found", field=what)
        module = _load_file(path, text, what)
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:
            raise ConfigError(f"invalid {what}: {text!r}: cannot import {where} ({type(e).__name__}: {e})",
                              field=what) from None
    fn = getattr(module, name, None)
    if fn is None:
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                         and getattr(v, "__module__", None) == module.__name__)
        raise ConfigError(f"invalid {what}: {text!r}: {where} has no {name!r} (it defines {', '.join(defined) or 'none'})",
                          field=what)
    if not callable(fn):
        raise ConfigError(f"invalid {what}: {text!r}: {name} is a {type(fn).__name__}, not a function", field=what)
    return fn


def _load_file(path: Path, text: str, what: str):
    module_name = "dptrain_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module = sys.modules.get(module_name)
    if module is not None:
        return module
    if str(path.parent) not in sys.path:  # its sibling modules import as they would for a script there
        sys.path.append(str(path.parent))
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[module_name]
        raise ConfigError(f"invalid {what}: {text!r}: loading {path.name} raised {type(e).__name__}: {e}",
                          field=what) from None
    return module


def user_modules(*fns) -> list:
    """The modules of the user's own code these callables live in, to be shipped by value to the
    workers: a module loaded from a file.py reference, or imported from a plain file (a module
    beside the user's script, a test file) that the cluster's processes may not be able to
    import, and the modules imported from the same folders (its helpers). Installed packages
    (site-packages), dptrain and __main__ (cloudpickle ships its functions by value anyway)
    are left to import by name."""
    out = []
    for fn in fns:
        name = getattr(fn, "__module__", None) or ""
        module = sys.modules.get(name)
        if module is None or name == "__main__" or name.split(".")[0] == "dptrain" or module in out:
            continue
        path = getattr(module, "__file__", None)
        if name.startswith("dptrain_user_") or (path and not _installed(path)):
            out.append(module)
    folders = {Path(m.__file__).resolve().parent for m in out if getattr(m, "__file__", None)}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if (module not in out and path and name != "__main__" and name.split(".")[0] != "dptrain"
                and Path(path).resolve().parent in folders and not _installed(path)):
            out.append(module)
    return out


def _installed(path: str) -> bool:
    """True for a file of an installed package or of Python's standard library."""
    resolved = Path(path).resolve()
    if {"site-packages", "dist-packages"} & set(resolved.parts):
        return True
    return resolved.is_relative_to(Path(sysconfig.get_paths()["stdlib"]).resolve())


# --------------------------------------------------------------------------- the factory

def _call_builder(fn, input_shape: tuple, num_outputs: int):
    """fn(), fn(input_shape, num_outputs), or fn with any keyword subset of those names."""
    available = {"input_shape": tuple(input_shape), "num_outputs": int(num_outputs)}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or C callable: call it plainly
        return fn()
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return fn(**available)
    kwargs = {k: v for k, v in available.items() if k in params}
    required = [n for n, p in params.items() if p.default is p.empty and n not in kwargs
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not required:
        return fn(**kwargs)
    if not kwargs and len(required) == 2:
        return fn(available["input_shape"], available["num_outputs"])
    raise TypeError(f"it must take no arguments or (input_shape, num_outputs); it requires {', '.join(required)}")


class ModelFactory:
    """Builds the run's model: the same parameter names, shapes and initial values on every call."""

    def __init__(self, builder, name: str, input_shape: tuple, num_outputs: int, dtype: str = "float32",
                 device: str = "cpu", seed: int = 0):
        self.builder, self.name = builder, name
        self.input_shape, self.num_outputs = tuple(input_shape), int(num_outputs)
        self.dtype, self.device, self.seed = dtype, device, seed

    def on(self, device: str) -> "ModelFactory":
        """The same factory, building on `device`."""
        return ModelFactory(self.builder, self.name, self.input_shape, self.num_outputs, self.dtype, device,
                            self.seed)

    def __call__(self) -> Module:
        init.manual_seed(self.seed)
        try:
            model = _call_builder(self.builder, self.input_shape, self.num_outputs)
        except Exception as e:
            raise ConfigError(f"invalid model: {self.name} raised {type(e).__name__}: {e}", field="model") from None
        if not isinstance(model, Module):
            raise ConfigError(f"invalid model: {self.name} returned a {type(model).__name__}, not a "
                              "dptrain.nn.Module", field="model")
        params = model.parameters()
        if not params:
            raise ConfigError(f"invalid model: {self.name} returned a {type(model).__name__} without parameters",
                              field="model")
        dt = as_dtype(self.dtype)
        if any(p.data.dtype != dt for p in params):
            model.to(self.dtype)
        if self.device != "cpu":
            model.to(self.device)
        for name, m in model.named_modules():
            if hasattr(m, "random_key"):
                m.random_key = nn_random.layer_key(name)
        model.train()
        model.flat()
        return model


def layout(model: Module) -> list:
    """[name, shape, dtype] of every parameter in order: how checkpoints and replicas identify a model."""
    return [[name, list(p.shape), str(p.dtype)] for name, p in model.named_parameters()]


def first_difference(a: list, b: list) -> str | None:
    """How two layouts differ, naming the first parameter that does; None if they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return (f"parameter {i} is {x[0]!r} {tuple(x[1])} {x[2]} in one and {y[0]!r} {tuple(y[1])} {y[2]} "
                    "in the other")
    if len(a) != len(b):
        longer = a if len(a) > len(b) else b
        return f"one has {len(longer) - min(len(a), len(b))} more parameter(s), the first {longer[min(len(a), len(b))][0]!r}"
    return None


def model_factory(cfg: TrainConfig, dataset, model=None) -> ModelFactory:
    """The factory for this run: `model` (a callable) if given, else cfg.model, checked against the data."""
    shape, outputs = dataset.input_shape, dataset.num_outputs
    spec = cfg.model if model is None else model
    if spec is None or is_widths(spec):
        dims = _widths(cfg, dataset, spec)

        def builder(dims=dims, activation=cfg.activation, dtype=cfg.dtype, seed=cfg.seed):
            return MLP(dims, activation=activation, dtype=dtype, seed=seed)
        return ModelFactory(builder, "-".join(map(str, dims)), shape, outputs, cfg.dtype, cfg.device, cfg.seed)
    if callable(spec):
        name = getattr(spec, "__qualname__", type(spec).__name__)
        return ModelFactory(spec, name, shape, outputs, cfg.dtype, cfg.device, cfg.seed)
    if spec == "gpt":  # sized by the run's settings
        def build_gpt(input_shape, num_outputs, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                      dropout=cfg.dropout):
            return gpt(input_shape, num_outputs, n_layer, n_head, n_embd, dropout)
        name = f"gpt-{cfg.n_layer}x{cfg.n_embd}"
        return ModelFactory(build_gpt, name, shape, outputs, cfg.dtype, cfg.device, cfg.seed)
    if spec in BUILTIN_MODELS:
        return ModelFactory(BUILTIN_MODELS[spec], spec, shape, outputs, cfg.dtype, cfg.device, cfg.seed)
    return ModelFactory(load_reference(spec, "model"), spec, shape, outputs, cfg.dtype, cfg.device, cfg.seed)


def _widths(cfg: TrainConfig, dataset, spec) -> list:
    n_in, n_out = dataset.num_features, dataset.num_outputs
    if spec is None:
        return [n_in, 256, 256, n_out]
    dims = [int(d) for d in spec]
    if dims[0] != n_in:
        raise ConfigError(f"invalid model: {dims} takes {dims[0]} inputs but {dataset.name} has {n_in} features",
                          field="model")
    if dims[-1] != n_out:
        what = "classes" if dataset.task == "classification" else "target columns"
        raise ConfigError(f"invalid model: {dims} has {dims[-1]} outputs but {dataset.name} has {n_out} {what}",
                          field="model")
    return dims


def loss_function(cfg: TrainConfig, dataset, loss=None):
    """The run's loss: `loss` (a callable or name) if given, else cfg.loss, else by the dataset's task."""
    spec = cfg.loss if loss is None else loss
    if spec is None:
        return cross_entropy_sum if dataset.task == "classification" else mse_sum
    if callable(spec):
        return spec
    if spec in BUILTIN_LOSSES:
        return BUILTIN_LOSSES[spec]
    return load_reference(spec, "loss")


def loss_name(loss) -> str:
    for name, fn in BUILTIN_LOSSES.items():
        if fn is loss:
            return name
    return getattr(loss, "__qualname__", type(loss).__name__)


# --------------------------------------------------------------------------- the check before a run

def check(factory: ModelFactory, loss, dataset, seed: int = 0) -> Module:
    """Build the model and run it and the loss on one training example, then on two copies of
    it, on the CPU; raise ConfigError naming what does not fit. Returns the model.

    Catches: a builder that fails or returns no Module; outputs that do not fit the labels;
    a loss that fails, returns no scalar, returns a mean instead of a sum (the same value
    for one copy and for two), or does not depend on the parameters.
    """
    model = factory.on("cpu")()
    x1, y1 = dataset.x_train[:1].astype(factory.dtype), dataset.y_train[:1]
    lname = loss_name(loss)
    values = []
    for copies in (1, 2):
        x, y = np.repeat(x1, copies, axis=0), np.repeat(y1, copies, axis=0)
        model.zero_grad()
        try:
            with nn_random.context(seed, 0, np.zeros(copies, dtype=np.uint64)):
                out = model(Tensor(x))
        except Exception as e:
            raise ConfigError(f"invalid model: {factory.name} fails on inputs of shape {x.shape} from "
                              f"{dataset.name}: {type(e).__name__}: {e}", field="model") from None
        if not isinstance(out, Tensor):
            raise ConfigError(f"invalid model: {factory.name}'s forward returned a {type(out).__name__}, not a Tensor",
                              field="model")
        expected = tuple(y.shape) + (dataset.num_outputs,)
        if loss is cross_entropy_sum and out.shape != expected:
            raise ConfigError(f"invalid model: the output of {factory.name}, shape {out.shape}, does not fit the labels "
                              f"of shape {y.shape}: expected {expected} for {dataset.num_outputs} classes",
                              field="model")
        try:
            value = loss(out, y)
        except Exception as e:
            field = "model" if lname in BUILTIN_LOSSES else "loss"
            raise ConfigError(f"invalid {field}: the output of {factory.name}, shape {out.shape}, does not fit the "
                              f"labels of shape {y.shape} under loss {lname}: {e}", field=field) from None
        if not isinstance(value, Tensor) or value.ndim != 0:
            got = f"shape {value.shape}" if isinstance(value, Tensor) else f"a {type(value).__name__}"
            raise ConfigError(f"invalid loss: {lname} returned {got} for {copies} example(s); it must return a scalar "
                              "Tensor, the SUM of the per-example losses", field="loss")
        if not value.requires_grad:
            raise ConfigError(f"invalid loss: {lname} does not depend on the model's parameters (no gradient)",
                              field="loss")
        value.backward()
        values.append(float(value.data))
    one, two = values
    if not np.isfinite(one) or not np.isfinite(two):
        raise ConfigError(f"invalid loss: {lname} gave {one} on a training example of {dataset.name}", field="loss")
    if abs(one) > 1e-6 and abs(two - one) <= 1e-4 * abs(one):
        raise ConfigError(f"invalid loss: {lname} gave {one:.6g} for one example and {two:.6g} for two copies of it: "
                          "a mean; return the SUM over examples (the trainer divides once by the total count)",
                          field="loss")
    return model
