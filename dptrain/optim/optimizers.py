"""SGD, Adam and AdamW over the flat buffer.

The update rules are small pure functions on arrays (`sgd_update`, `adam_update`)
that change their arguments in place; the classes hold hyperparameters and state
and call them once per step on the whole flat parameter array.
"""

from __future__ import annotations

import concurrent.futures
import math
from typing import Iterable

import numpy as np

from .. import backend
from ..nn.flat import flatten
from . import kernels


# Elements per block of a CPU update. The four operands' blocks (gradient, its scratch, state,
# parameter) fit a 1 MiB L2 cache at 2^16 float32s; smaller blocks pay numpy's per-call cost
# more often (2^14 was 12% slower on the 784-1024-1024-10 model, measured interleaved).
CHUNK = 1 << 16

# Elements per block when several threads update: each numpy call lets go of the GIL and takes it
# back, and taking it back from a thread on the other core waits for that core to wake (tens of
# microseconds on a VM), so threads over blocks of CHUNK spend their time handing the GIL over
# (2 threads were slower than 1 on 1.86 M parameters). Blocks of 2^18 (1 MiB of float32s per
# operand, within a 2 MiB L2) make a quarter of the calls: 2 threads on 2 cores updated 1.86 M
# parameters in 1.61 ms against 2.43 ms over blocks of CHUNK and 1.79 ms on one thread (SGD;
# 3.60 / 4.69 / 5.82 ms for Adam; at 20 M, 18.5 / 24.5 / 32.7 ms), measured interleaved.
THREAD_CHUNK = 1 << 18


def _check(name: str, value: float, low: float = 0.0, high: float | None = None, strict: bool = False):
    value = float(value)
    bad = (not math.isfinite(value) or value < low or (strict and value == low)
           or (high is not None and value >= high))
    if bad:
        raise ValueError(f"invalid {name}: {value}")
    return value


_POOLS: dict = {}


# A thread's hand-off costs about what a few blocks' update does: on 2 cores, 2 threads made the
# update of 78,858 parameters (2 blocks) 0.19 -> 0.36 ms slower and that of 1.86 M (28 blocks) faster.
MIN_BLOCKS_PER_THREAD = 8


def _pool(size: int) -> concurrent.futures.ThreadPoolExecutor:
    """This process's pool of `size` threads for blocked updates (made once, kept)."""
    if size not in _POOLS:
        _POOLS[size] = concurrent.futures.ThreadPoolExecutor(max_workers=size, thread_name_prefix="dptrain-update")
    return _POOLS[size]


# --------------------------------------------------------------------------- update rules

def _compiled(lr, weight_decay, *arrays) -> bool:
    """Whether a block's rule runs as a compiled kernel (kernels.py): numpy arrays it can take, a
    scalar learning rate, and a weight decay that is a scalar or a per-entry array alike."""
    return isinstance(lr, (int, float)) and kernels.usable(
        *arrays, None if isinstance(weight_decay, (int, float)) else weight_decay)


def _applies(value) -> bool:
    """Whether a rate (a number, or a parameter group's per-entry array) changes anything."""
    return not isinstance(value, (int, float)) or value != 0


def sgd_update(param, grad, buf, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
               first_step=False):
    """One SGD step in place (torch.optim.SGD's rule). Returns nothing; `grad` is not modified.
    `lr` and `weight_decay` may be arrays shaped like `param` (parameter groups).

    g = grad + weight_decay * param
    buf = momentum * buf + (1 - dampening) * g     (buf = g on the first step)
    param -= lr * (g + momentum * buf if nesterov else buf)
    """
    g = grad + weight_decay * param if _applies(weight_decay) else grad
    if momentum:
        if first_step:
            buf[...] = g
        else:
            buf *= momentum
            buf += (1 - dampening) * g if dampening else g  # 1.0 * g is g: the same numbers, one pass less
        g = g + momentum * buf if nesterov else buf
    param -= lr * g


def adam_update(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                decoupled=False):
    """One Adam (or AdamW, `decoupled=True`) step in place; `step` counts from 1.

    Adam adds weight_decay * param to the gradient (L2); AdamW instead shrinks the
    parameter by lr * weight_decay before the update (Loshchilov & Hutter, 2019).
    """
    xp = backend.array_module(param)
    if _applies(weight_decay) and decoupled:
        param *= 1 - lr * weight_decay
        g = grad
    elif _applies(weight_decay):
        g = grad + weight_decay * param
    else:
        g = grad
    # one scratch array for every term (the same operations in the same order as the formulas,
    # so the same bits; 20% faster on a block of 2^16 than a new array per term)
    t = xp.multiply(g, 1 - beta1)
    m *= beta1
    m += t  # m = beta1 * m + (1 - beta1) * g
    xp.multiply(g, g, out=t)
    t *= 1 - beta2
    v *= beta2
    v += t  # v = beta2 * v + (1 - beta2) * g * g
    bias1 = 1 - beta1 ** step
    bias2 = 1 - beta2 ** step
    xp.divide(v, bias2, out=t)
    xp.sqrt(t, out=t)
    t += eps  # denom = sqrt(v / bias2) + eps
    xp.divide(m, t, out=t)
    t *= lr / bias1
    param -= t  # param -= lr / bias1 * m / denom


# --------------------------------------------------------------------------- classes

class Optimizer:
    """Base class: binds the parameters to one flat buffer and steps it in place.

    `params` is a list of parameters, or of parameter groups as in torch.optim: dicts with
    "params" and the options that differ for them ("weight_decay"; "lr_scale", a factor on the
    learning rate). The flat buffer keeps the order the parameters already have in one (a
    model's: the order workers and the server agree on), else takes the groups' order. Where
    groups differ, the option becomes an array over the flat buffer (`*_per_entry`, kept with
    the state: checkpoints and sharded servers' ranges carry it).
    """

    hyperparameters: tuple = ()
    GROUP_OPTIONS = {"weight_decay": "weight_decay_per_entry", "lr_scale": "lr_scale_per_entry"}

    def __init__(self, params: Iterable, lr: float):
        groups = _groups(params)
        every = [p for g in groups for p in g["params"]]
        if not every:
            raise ValueError("optimizer got an empty parameter list")
        self.lr = _check("learning rate", lr, strict=True)
        buf = getattr(every[0], "_flat", None)
        if buf is not None and len(buf.shapes) == len(every) and all(getattr(p, "_flat", None) is buf for p in every):
            every.sort(key=lambda p: p._flat_index)  # already one buffer: its layout stays
        self.flat = flatten(every)
        if backend.array_module(self.flat.data) is np:
            kernels.preload(self.flat.size)
        self.steps = 0  # updates applied so far
        self.param_groups = groups
        self._per_entry = {}  # option -> its array over the flat buffer, where groups differ

    def _group_arrays(self) -> None:
        """Make the per-entry arrays of the options some group sets (the subclass's defaults set first)."""
        defaults = {"weight_decay": getattr(self, "weight_decay", 0.0), "lr_scale": 1.0}
        params = sorted((p for g in self.param_groups for p in g["params"]), key=lambda p: p._flat_index)
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        xp = backend.array_module(self.flat.data)
        for option in self.GROUP_OPTIONS:
            if not any(option in g for g in self.param_groups):
                continue
            values = np.zeros(self.flat.size, dtype=self.flat.data.dtype)
            for p, (shape, offset) in zip(params, zip(self.flat.shapes, self.flat.offsets)):
                value = _check(option, group_of[id(p)].get(option, defaults[option]))
                values[offset:offset + int(np.prod(shape, dtype=np.int64))] = value
            self._per_entry[option] = xp.asarray(values)

    def _option(self, option: str, scalar, sl: slice):
        """An option's value for the block `sl`: the scalar, or its per-entry array's block."""
        per_entry = self._per_entry.get(option)
        return scalar if per_entry is None else per_entry[sl]

    def _lr(self, sl: slice):
        scale = self._per_entry.get("lr_scale")
        return self.lr if scale is None else self.lr * scale[sl]

    def zero_grad(self) -> None:
        self.flat.zero_grad()

    def step(self) -> None:
        """Apply one update with the gradients now in the parameters' `.grad`."""
        self.update(self.flat.data, self.flat.grad)

    threads = 1  # threads that update disjoint runs of blocks at once (--update-threads; the server's auto)

    def update(self, param, grad, prepare=None) -> None:
        """Apply one update to a flat parameter array given a flat gradient array.

        On the CPU the arrays are walked in blocks of CHUNK elements, so the several
        passes of an update (momentum, decay, step) run on a block while it is in
        cache: about 40% faster on a 1.9M-parameter model than whole-array passes.
        `prepare(start, stop)`, if given, first fills grad[start:stop] (the parameter
        server sums the workers' gradients there, in the same pass), or returns the array it
        filled instead (a scratch block of its own, which the block's update then reads).

        With `threads` T > 1 the blocks of CHUNK are cut into T contiguous runs, updated at once
        by this thread (the first run) and T - 1 pool threads, each over its run in blocks of
        THREAD_CHUNK (whole blocks of CHUNK, and a ragged end): numpy lets go of the GIL inside
        each array operation, and every rule is elementwise, so the numbers are those of one
        thread, bit for bit. `prepare` is then called from several threads (for distinct blocks),
        on blocks that start where one thread's do (`grain`: a sum per block of CHUNK inside one
        is one thread's sum). Each thread gets MIN_BLOCKS_PER_THREAD blocks of CHUNK at least: a
        smaller buffer takes fewer threads (one, under 2 x 8 blocks).
        """
        self.steps += 1
        n = param.size
        chunk = self.grain(param)
        starts = list(range(0, n, chunk))
        t = max(1, min(int(self.threads), len(starts) // MIN_BLOCKS_PER_THREAD))
        if t == 1:
            self._run(param, grad, prepare, [(a, min(a + chunk, n)) for a in starts])
            return
        cuts = [starts[len(starts) * j // t] for j in range(t)] + [n]
        parts = [[(a, min(a + THREAD_CHUNK, hi)) for a in range(lo, hi, THREAD_CHUNK)]
                 for lo, hi in zip(cuts, cuts[1:])]
        futures = [_pool(t - 1).submit(self._run, param, grad, prepare, part) for part in parts[1:]]
        try:
            self._run(param, grad, prepare, parts[0])
        finally:
            concurrent.futures.wait(futures)  # no thread still writes when this returns or raises
        for f in futures:
            f.result()  # a pool thread's exception, raised here

    @staticmethod
    def grain(param) -> int:
        """The elements of one thread's block of `param` (CHUNK on the CPU; the whole array on a GPU)."""
        return max(param.size, 1) if backend.array_module(param) is not np else CHUNK

    def _run(self, param, grad, prepare, blocks) -> None:
        """Prepare and update these (start, stop) blocks, in order."""
        for start, stop in blocks:
            block = prepare(start, stop) if prepare is not None else None
            self._update(param[start:stop], grad[start:stop] if block is None else block, slice(start, stop))

    def _update(self, param, grad, sl: slice) -> None:
        """Update `param` (the block `sl` of the flat parameters) in place; state is sliced alike."""
        raise NotImplementedError

    def _state_arrays(self) -> dict:
        return {}

    def _all_arrays(self) -> dict:
        """The state arrays and the per-entry options (what a checkpoint and a shard's range hold)."""
        return {**self._state_arrays(), **{self.GROUP_OPTIONS[k]: a for k, a in self._per_entry.items()}}

    def state_dict(self) -> dict:
        """Hyperparameters, step count and state arrays (numpy copies)."""
        return {"type": type(self).__name__, "steps": self.steps, "lr": self.lr,
                "hyperparameters": {k: getattr(self, k) for k in self.hyperparameters},
                "state": {k: backend.to_numpy(a).copy() for k, a in self._all_arrays().items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("type") != type(self).__name__:
            raise ValueError(f"load_state_dict: state of a {state.get('type')} optimizer, this is {type(self).__name__}")
        xp = backend.array_module(self.flat.data)
        for option, key in self.GROUP_OPTIONS.items():  # groups' options: adopted from the state (a shard's range)
            if key in state["state"] and option not in self._per_entry:
                self._per_entry[option] = xp.asarray(np.array(state["state"][key], dtype=self.flat.data.dtype))
        arrays = self._all_arrays()
        for k, a in arrays.items():
            src = state["state"].get(k)
            if src is None or np.shape(src) != a.shape:
                raise ValueError(f"load_state_dict: state {k!r} has shape {np.shape(src)}, expected {a.shape}")
        for k, a in arrays.items():
            a[...] = backend.to_device(np.asarray(state["state"][k]), backend.device_of(a))
        self.steps = int(state["steps"])
        self.lr = float(state["lr"])
        for k, v in state["hyperparameters"].items():
            setattr(self, k, v)

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={getattr(self, k)}" for k in ("lr",) + self.hyperparameters)
        return f"{type(self).__name__}({hp})"


class SGD(Optimizer):
    hyperparameters = ("momentum", "dampening", "nesterov", "weight_decay")

    def __init__(self, params, lr: float = 0.01, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__(params, lr)
        self.momentum = _check("momentum", momentum, high=1.0)
        self.dampening = _check("dampening", dampening, high=1.0)
        self.weight_decay = _check("weight_decay", weight_decay)
        self.nesterov = bool(nesterov)
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            raise ValueError(f"invalid nesterov: needs momentum > 0 and dampening 0, got momentum "
                             f"{self.momentum} and dampening {self.dampening}")
        xp = backend.array_module(self.flat.data)
        self.momentum_buffer = xp.zeros_like(self.flat.data) if self.momentum else None
        self._group_arrays()

    def _update(self, param, grad, sl):
        buf = self.momentum_buffer[sl] if self.momentum else None
        lr, weight_decay = self._lr(sl), self._option("weight_decay", self.weight_decay, sl)
        rule = kernels.sgd if _compiled(lr, weight_decay, param, grad, buf) else sgd_update
        rule(param, grad, buf, lr, self.momentum, self.dampening, self.nesterov, weight_decay, self.steps == 1)

    def _state_arrays(self):
        return {"momentum_buffer": self.momentum_buffer} if self.momentum else {}


class Adam(Optimizer):
    hyperparameters = ("beta1", "beta2", "eps", "weight_decay")
    decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, lr)
        self.beta1 = _check("beta1", betas[0], high=1.0)
        self.beta2 = _check("beta2", betas[1], high=1.0)
        self.eps = _check("eps", eps, strict=True)
        self.weight_decay = _check("weight_decay", weight_decay)
        xp = backend.array_module(self.flat.data)
        self.exp_avg = xp.zeros_like(self.flat.data)
        self.exp_avg_sq = xp.zeros_like(self.flat.data)
        self._group_arrays()

    def _update(self, param, grad, sl):
        m, v = self.exp_avg[sl], self.exp_avg_sq[sl]
        lr, weight_decay = self._lr(sl), self._option("weight_decay", self.weight_decay, sl)
        rule = kernels.adam if _compiled(lr, weight_decay, param, grad, m, v) else adam_update
        rule(param, grad, m, v, self.steps, lr, self.beta1, self.beta2, self.eps, weight_decay, self.decoupled)

    def _state_arrays(self):
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}


class AdamW(Adam):
    """Adam with decoupled weight decay; torch's default weight_decay of 0.01."""

    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, lr, betas, eps, weight_decay)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def _groups(params) -> list:
    """Parameter groups (dicts with "params" and options) from a list of parameters or of groups."""
    params = list(params)
    if params and isinstance(params[0], dict):
        groups = []
        for g in params:
            unknown = set(g) - {"params", *Optimizer.GROUP_OPTIONS}
            if "params" not in g or unknown:
                raise ValueError(f"invalid parameter group: {sorted(unknown) or 'no params'} (a group has "
                                 f"'params' and any of {sorted(Optimizer.GROUP_OPTIONS)})")
            groups.append(dict(g, params=list(g["params"])))
        return groups
    return [{"params": params}]
