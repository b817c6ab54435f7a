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
   flat parameters; then step k + 1 reads them. Nothing else changes the parameters,
   so a step is a pure function of (parameters, optimizer state, k, data): what makes
   retries after failures exact.

`step_metrics` combines the workers' numbers into the step's record the same way.
"""

from __future__ import annotations

import numpy as np

from . import backend
from .config import TrainConfig
from .data import Dataset
from .models import ModelFactory, count_correct
from .nn import flatten, random as nn_random
from .nn.flat import aligned_zeros
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
        self.model = factory()
        self.flat = self.model.flat()
        xp = backend.xp_for(cfg.device)
        dt = as_dtype(cfg.dtype)
        self.xp = xp
        self.x_train = xp.asarray(dataset.x_train, dtype=dt)
        self.y_train = xp.asarray(dataset.y_train if self.task == "classification" else dataset.y_train.astype(dt))
        self.x_test = xp.asarray(dataset.x_test, dtype=dt)
        self.y_test = xp.asarray(dataset.y_test if self.task == "classification" else dataset.y_test.astype(dt))

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
        self.flat.zero_grad()
        count = len(indices)
        if count == 0:  # an empty shard contributes nothing
            return 0.0, 0, 0
        size = self.cfg.micro_batch or count
        loss_sum, correct = 0.0, 0
        self.model.train()
        for start in range(0, count, size):
            part = indices[start:start + size]
            idx = self.xp.asarray(part)
            x, y = self.x_train[idx], self.y_train[idx]
            begin = first_position + start
            with nn_random.context(self.cfg.seed, step, np.arange(begin, begin + len(part))):
                out = self.model(Tensor(x))
            loss = self.loss(out, y)
            loss.backward()  # adds to what the micro-batches before wrote
            loss_sum += float(loss.data)
            if self.task == "classification":
                correct += count_correct(out.data, y)
            del out, loss  # this micro-batch's activations go before the next one's come
        return loss_sum, correct, count

    def evaluate(self, split: str = "test") -> dict:
        """Mean loss (and accuracy for classification) over a whole split, in batches, in eval mode."""
        x, y = (self.x_test, self.y_test) if split == "test" else (self.x_train, self.y_train)
        total, correct, n = 0.0, 0, len(x)
        bs = self.cfg.eval_batch_size
        self.model.eval()
        try:
            with no_grad():
                for start in range(0, n, bs):
                    xb, yb = x[start:start + bs], y[start:start + bs]
                    out = self.model(Tensor(xb))
                    total += float(self.loss(out, yb).data)
                    if self.task == "classification":
                        correct += count_correct(out.data, yb)
        finally:
            self.model.train()
        result = {"loss": total / max(n, 1)}
        if self.task == "classification":
            result["accuracy"] = correct / max(n, 1)
        return result


def mean_gradient(grads: list, count: int, out, start: int = 0, stop: int | None = None) -> None:
    """out[start:stop] = (grads[0] + grads[1] + ...)[start:stop] / count: the workers' gradients of
    loss sums added in rank order and divided once by the batch's example count (part 3).
    `out` may be grads[0] itself. The server calls it block by block inside its update."""
    dst = out[start:stop]
    if len(grads) == 1:
        np.divide(grads[0][start:stop], count, out=dst)
        return
    np.add(grads[0][start:stop], grads[1][start:stop], out=dst)
    for g in grads[2:]:
        dst += g[start:stop]
    dst /= count


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
