"""Models and losses as a user writes them, for the tests (`--model tests/user_models.py:build`)."""

import numpy as np

import dptrain as dp
from dptrain import nn
from dptrain.nn import functional as F


class DropoutCNN(nn.Module):
    """A 1-D CNN with dropout and average pooling, for (n, length) inputs."""

    def __init__(self, length: int, classes: int):
        super().__init__()
        self.conv = nn.Conv1d(1, 6, 3, padding=1)
        self.pool = nn.AvgPool1d(2)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(6 * (length // 2), classes)

    def forward(self, x):
        h = self.pool(self.conv(x.reshape(x.shape[0], 1, x.shape[1])).relu())
        return self.fc(self.drop(h.reshape(h.shape[0], -1)))


def build(input_shape, num_outputs):
    return DropoutCNN(input_shape[0], num_outputs)


def build_without_arguments():
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))


def small_transformer(input_shape, num_outputs):
    return dp.models.TinyTransformer(num_outputs, input_shape[0], d_model=16, nhead=2, layers=1, dropout=0.1)


def smooth_l1_sum(output, target):
    """A user loss: Huber (delta 1) summed over examples and outputs."""
    d = output - target
    a = (d * d + 1.0) ** 0.5 - 1.0  # a smooth |d|
    return a.sum()


def mean_loss(output, target):
    return F.cross_entropy(output, target, reduction="mean")


def vector_loss(output, target):
    return output.sum(axis=1)


def raises(input_shape, num_outputs):
    raise RuntimeError("this builder is broken")


def returns_list(input_shape, num_outputs):
    return [nn.Linear(2, 2)]


def wrong_outputs(input_shape, num_outputs):
    return nn.Linear(int(np.prod(input_shape)), num_outputs + 3)


def different_on_workers(input_shape, num_outputs):
    """A builder that gives worker actors another model than the server (no bias): refused."""
    import inspect

    from dptrain.distributed.worker import Worker
    on_worker = any(isinstance(f.frame.f_locals.get("self"), Worker) for f in inspect.stack())
    return nn.Linear(int(np.prod(input_shape)), num_outputs, bias=not on_worker)


class TiedCharModel(nn.Module):
    """A next-token model whose output head is its token embedding (GPT-2's and nanoGPT's tie):
    one parameter used twice, listed once by parameters() and under both names by state_dict."""

    def __init__(self, vocab: int, d: int = 8):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, x):  # (batch, positions) token ids -> (batch, positions, vocab)
        return self.lm_head(self.norm(self.wte(x).tanh()))


def build_tied(input_shape, num_outputs):
    return TiedCharModel(num_outputs)
