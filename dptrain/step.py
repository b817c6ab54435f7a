"""The step contract: what one synchronous training step is, wherever it runs.

One process (`loop.LocalLoop`), N workers behind a parameter server (`distributed/`),
any transport in between: every step is this, and so N workers give one process's
parameters (1e-10 relative in float64):

1. **Indices from (seed, step).** `data.BatchSampler(num_examples, batch_size, seed)`
   picks step k's global batch from k alone (a fresh permutation per epoch); worker r
   of N takes the contiguous slice `sampler.shard_at(k, N, r)` (sizes differ by at most
   one). Nobody ships indices; a replayed step picks the same examples.
2. **The gradient of the loss SUM.** A `Replica` runs forward and backward on its
   examples and leaves d(sum of per-example losses)/d(parameters) in its flat gradient
   buffer, with the loss sum, the correct count and the example count. Per-example
   randomness (dropout) is keyed by (seed, step, the example's position in the global
   batch), not by the worker holding it.
3. **Worker-order sum, one division.** Where the gradients meet, they are added in
   rank order and divided once by the total example count: `mean_gradient`. That is
   the full batch's mean gradient, whatever N is and however the batch split.
4. **The optimizer's update**, with the schedule's learning rate for step k, on the
   flat parameters (with --clip-grad-norm, of the mean gradient scaled as
   torch.nn.utils.clip_grad_norm_ does, by its global L2 norm: `apply_mean_gradient`);
   then step k + 1 reads them. Nothing else changes the parameters,
   so a step is a pure function of (parameters, optimizer state, k, data): what makes
   retries after failures exact.

`step_metrics` combines the workers' numbers into the step's record the same way.
"""

from __future__ import annotations

import threading

import numpy as np

from . import backend, tensor
from .config import TrainConfig
from .data import Dataset, shard_bounds
from .data.mapped import is_mapped
from .models import ModelFactory, count_correct
from .nn import flatten, random as nn_random
from .nn.flat import aligned_zeros
from .optim import kernels
from .tensor import Tensor, as_dtype, no_grad


class Replica:
    """A model replica with its copy of the data on its device (part 2 of the contract).

    `compute_gradients(indices, step, first_position)` leaves the gradient of the summed
    loss in `self.flat.grad` and returns (loss_sum, correct, count). The forward pass
    runs in train mode inside nn.random's context for (seed, step, the examples'
    positions in the step's global batch), so dropout masks do not depend on which
    worker holds an example.
    """

    def __init__(self, cfg: TrainConfig, dataset: Dataset, factory: ModelFactory, loss):
        self.cfg = cfg
        self.task = dataset.task
        self.loss = loss
        self.model = factory().train()  # train mode from here on (evaluate restores it)
        self.flat = self.model.flat()
        xp = backend.xp_for(cfg.device)
        dt = as_dtype(cfg.dtype)
        self.xp, self.dtype = xp, dt
        self.label_dtype = np.int64 if self.task == "classification" else dt

        def keep(a, dtype):  # in memory: on the device once; in a file (data.mapped): read a batch at a time
            return a if is_mapped(a) else xp.asarray(a, dtype=dtype)
        labels = None if self.task == "classification" else dt  # class labels keep their integer dtype
        self.x_train, self.x_test = keep(dataset.x_train, dt), keep(dataset.x_test, dt)
        self.y_train, self.y_test = keep(dataset.y_train, labels), keep(dataset.y_test, labels)

    def batch(self, x, y, rows) -> tuple:
        """The examples `rows` (indices, numpy, or a slice) of inputs `x` and labels `y`, on the
        device: indexed there, or read from their files."""
        def take(a, dtype):
            if is_mapped(a):
                return self.xp.asarray(a[rows], dtype=dtype)
            return a[rows if isinstance(rows, slice) else self.xp.asarray(rows)]
        return take(x, self.dtype), take(y, self.label_dtype)

    def load_parameters(self, flat_params, start: int = 0, stop: int | None = None) -> None:
        """Copy a flat parameter array (numpy) into the model: one copy, no per-tensor work.
        `start` and `stop` copy only that range of it; given both, `flat_params` may also be
        just that range's values (a sharded server's slice)."""
        if flat_params.shape == self.flat.data.shape:
            flat_params = flat_params[start:stop]
        elif stop is None or flat_params.shape != (stop - start,):
            raise ValueError(f"parameters of shape {flat_params.shape} do not fit this model's "
                             f"{self.flat.data.shape}" + (f" (range {start}:{stop})" if stop is not None else ""))
        self.flat.data[start:stop] = self.xp.asarray(flat_params)

    def bind_parameters(self, storage=None) -> None:
        """Let the model read its parameters from `storage`, a 1-D array laid out like the flat
        buffer that already holds them (the server's shared-memory segment, mapped read-only):
        its parameters become views of it and nothing is copied, ever. None: a private buffer
        again, holding a copy of the current values (flatten's own). The gradients stay where they are."""
        self.flat = flatten(self.model.parameters(), data=storage, grad=self.flat.grad,
                            data_is_current=storage is not None)

    def bind_gradients(self, storage=None) -> None:
        """Let backward write the gradients into `storage`, a 1-D array laid out like the flat
        buffer (a shared-memory segment, say), instead of the model's own; None: a private
        buffer again. The parameters stay where they are."""
        if storage is None:
            storage = aligned_zeros(self.xp, self.flat.size, self.flat.data.dtype)
        self.flat = flatten(self.model.parameters(), data=self.flat.data, grad=storage, data_is_current=True)

    def compute_gradients(self, indices, step: int = 0, first_position: int = 0) -> tuple[float, float, int]:
        """With cfg.micro_batch M, the examples go through forward and backward M at a time and
        their gradients add up in the flat buffer (gradient accumulation): the loss is a sum, so
        the result is the one pass's (to rounding), with the activations of M examples alive at
        once instead of all of them. Each example keeps its position, so its dropout mask too."""
        # the backward overwrites each gradient it writes first (claim_grad); the rest is settled below
        self.flat.zero_grad(lazy=tensor.DIRECT_GRAD_WRITES)
        count = len(indices)
        if count == 0:  # an empty shard contributes nothing
            self.flat.settle()
            return 0.0, 0, 0
        size = self.cfg.micro_batch or count
        loss_sum, correct = 0.0, 0
        for start in range(0, count, size):
            part = indices[start:start + size]
            x, y = self.batch(self.x_train, self.y_train, part)
            begin = first_position + start
            with nn_random.context(self.cfg.seed, step, np.arange(begin, begin + len(part))):
                out = self.model(Tensor(x))
            loss = self.loss(out, y)
            loss.backward()  # adds to what the micro-batches before wrote
            loss_sum += float(loss.data)
            if self.task == "classification":
                correct += count_correct(out.data, y)
            del out, loss  # this micro-batch's activations go before the next one's come
        self.flat.settle()  # zeros where no backward wrote (a parameter this batch did not use)
        return loss_sum, correct, count

    def evaluate(self, split: str = "test", part: int = 0, of: int = 1, final: bool = False) -> list:
        """Part `part` of `of` of an evaluation of a split (`evaluation_plan`): [loss sum, correct,
        count] of each of its batches, in order, in eval mode. `combine_evaluation` of every part's
        lists, in part order, is the one-process figure, bit for bit."""
        x, y = (self.x_test, self.y_test) if split == "test" else (self.x_train, self.y_train)
        plan = evaluation_plan(self.cfg, split, len(x), len(self.x_test), final)
        lo, hi = shard_bounds(len(plan), of, part)
        sums = []
        self.model.eval()
        try:
            with no_grad():
                for start, stop in plan[lo:hi]:
                    xb, yb = self.batch(x, y, slice(start, stop))
                    out = self.model(Tensor(xb))
                    # a sequence's examples count the fraction of positions right: not a whole number
                    correct = count_correct(out.data, yb) if self.task == "classification" else 0
                    sums.append([float(self.loss(out, yb).data), correct, int(stop - start)])
        finally:
            self.model.train()
        return sums

    def evaluation(self, split: str = "test", final: bool = False) -> dict:
        """The split's loss (and accuracy) in this process: the whole evaluation's figure."""
        return combine_evaluation(self.evaluate(split, final=final), self.task == "classification")


EVAL_SEED_KEY = 0xE7A1
SPLIT_KEYS = {"train": 0, "test": 1}


def evaluation_plan(cfg: TrainConfig, split: str, n: int, n_test: int, final: bool = False) -> list:
    """The [start, stop) batches an evaluation of a split of `n` examples runs, in order: the
    split cut into consecutive batches of cfg.eval_batch_size; with cfg.eval_batches K, a fixed
    choice of K of them, drawn from (seed, split): the same batches at every evaluation during
    the run (an estimate, as nanoGPT's eval_iters). The held-out split is evaluated whole
    without K, and always for the run's `final` figure; the training split is an estimate even
    then: K of its batches, or as many as the held-out split has (not a second pass over the
    whole training set)."""
    size = cfg.eval_batch_size
    batches = [(a, min(a + size, n)) for a in range(0, n, size)]
    limit = None if (final and split == "test") else cfg.eval_batches
    if limit is None and split == "train":
        limit = max(1, -(-n_test // size))
    if limit is not None and limit < len(batches):
        rng = np.random.default_rng([cfg.seed, SPLIT_KEYS[split], EVAL_SEED_KEY])
        batches = [batches[i] for i in np.sort(rng.choice(len(batches), size=limit, replace=False))]
    return batches


def combine_evaluation(parts: list, classification: bool) -> dict:
    """{loss, accuracy, count} from [loss sum, correct, count] of every batch, in plan order: the
    sums added in that order, divided once."""
    total, correct, n = 0.0, 0, 0
    for loss_sum, right, count in parts:
        total += loss_sum
        correct += right
        n += count
    result = {"loss": total / max(n, 1), "count": n}
    if classification:
        result["accuracy"] = correct / max(n, 1)
    return result


def mean_gradient(grads: list, count: int, out, start: int = 0, stop: int | None = None, into=None) -> None:
    """out[start:stop] = (grads[0] + grads[1] + ...)[start:stop] / count: the workers' gradients of
    loss sums added in rank order and divided once by the batch's example count (part 3).
    `out` may be grads[0] itself. The server calls it block by block inside its update; given
    `into` (an array of stop - start entries), the block's mean goes there instead of `out`.

    A count that is a power of two (a batch of 256) multiplies by its reciprocal instead: 2^-k is
    exact, so x * 2^-k is x / 2^k rounded once, the same bits, and a multiply is about a third
    of a divide's time (the update of 1.86 M parameters went from 1.95 to 1.66 ms)."""
    dst = out[start:stop] if into is None else into
    count = int(count)
    parts = [g[start:stop] for g in grads]
    if count > 0 and kernels.usable(dst, *parts):
        kernels.mean(dst, parts, count)  # the same adds and scaling, in one pass
        return
    if len(parts) == 1:
        total = parts[0]
    else:
        total = np.add(parts[0], parts[1], out=dst)
        for g in parts[2:]:
            total += g
    if count > 0 and count & (count - 1) == 0:
        np.multiply(total, 1.0 / count, out=dst)
    else:
        np.divide(total, count, out=dst)


_scratch = threading.local()


def scratch_block(n: int, dtype):
    """This thread's scratch array of `n` entries of `dtype` (one per thread, reused: it stays in
    cache from one block of an update to the next)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < n or buf.dtype != dtype:
        buf = _scratch.buf = aligned_zeros(np, n, dtype)
    return buf[:n]


def sum_of_squares(grad) -> float:
    """The sum of the squares of a flat array's entries (numpy or cupy)."""
    return float(backend.array_module(grad).dot(grad, grad))


def clip_scale(norm: float, max_norm: float | None) -> float:
    """What --clip-grad-norm scales the mean gradient by, as torch.nn.utils.clip_grad_norm_ does:
    min(1, max_norm / (norm + 1e-6)); 1 without a maximum."""
    return 1.0 if max_norm is None else min(1.0, max_norm / (norm + 1e-6))


def apply_mean_gradient(optimizer, addends: list, count: int, lr: float, max_norm: float | None = None) -> float:
    """Parts 3 and 4 over one flat buffer (the optimizer's): the addends' mean gradient, clipped to
    `max_norm` if given, fed to the optimizer at rate `lr`; returns the sum of the squares of the
    mean gradient before clipping (its global L2 norm squared). Without a maximum it is one pass:
    each block's mean is computed inside the optimizer's pass, into a scratch block of the
    thread's on the CPU (the flat gradient is then left as it was), and its squares summed there.
    With one, the mean comes first (the norm needs all of it), then the scaled update."""
    grad = optimizer.flat.grad
    if max_norm is None:
        squares = {}  # block start -> its sum of squares, added in block order after (threads: optimizer.update)

        grain = optimizer.grain(grad)
        on_cpu = backend.array_module(grad) is np

        def prepare(start, stop):  # the block's mean in a scratch block: it never goes to memory
            block = scratch_block(stop - start, grad.dtype) if on_cpu else grad[start:stop]
            mean_gradient(addends, count, grad, start, stop, into=block)
            for lo in range(0, stop - start, grain):  # one thread's blocks: the same sum whatever the threads
                squares[start + lo] = sum_of_squares(block[lo:lo + grain])
            return block
        optimizer.lr = lr
        optimizer.update(optimizer.flat.data, grad, prepare)
        total = 0.0
        for start in sorted(squares):
            total += squares[start]
        return total
    squares = mean_and_squares(addends, count, grad)
    scaled_update(optimizer, lr, clip_scale(squares ** 0.5, max_norm))
    return squares


def mean_and_squares(addends: list, count: int, grad) -> float:
    """grad = the addends' mean gradient (all of it); the sum of its squares."""
    mean_gradient(addends, count, grad)
    return sum_of_squares(grad)


def scaled_update(optimizer, lr: float, scale: float) -> None:
    """The optimizer's update from the mean gradient in its flat buffer, scaled by `scale` first."""
    grad = optimizer.flat.grad
    if scale < 1.0:
        grad *= scale
    optimizer.lr = lr
    optimizer.update(optimizer.flat.data, grad)


def step_metrics(step: int, metrics: list, lr: float) -> dict:
    """The step's record from the workers' metrics (in rank order): the batch's mean loss, its
    example and correct counts, the learning rate, the slowest worker's compute time, and the
    bytes each worker sent of its gradient."""
    count = sum(m["count"] for m in metrics)
    record = {"step": step, "loss": sum(m["loss_sum"] for m in metrics) / max(count, 1), "count": count,
              "correct": sum(m["correct"] for m in metrics), "lr": lr,
              "compute_s": max(m["compute_s"] for m in metrics)}
    if metrics and "sent_bytes" in metrics[0]:  # what the gradients used cost on the wire (distributed)
        record["sent_bytes"] = [m["sent_bytes"] for m in metrics]
    return record
