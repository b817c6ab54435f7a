"""dptrain: data-parallel training on Ray with a small autograd engine of its own.

    import dptrain as dp

    class Net(dp.nn.Module):                     # any Module you write
        def __init__(self, length, classes):
            super().__init__()
            self.conv = dp.nn.Conv1d(1, 16, 5, stride=2)
            self.fc = dp.nn.Linear(16 * ((length - 5) // 2 + 1), classes)

        def forward(self, x):
            h = self.conv(x.reshape(x.shape[0], 1, x.shape[1])).relu()
            return self.fc(h.reshape(h.shape[0], -1))

    cfg = dp.TrainConfig(dataset="mnist1d", workers=4, epochs=10, optimizer="adam", lr=0.01)
    result = dp.Trainer(cfg, model=lambda input_shape, num_outputs: Net(input_shape[0], num_outputs),
                        loss="cross_entropy").fit()    # a loss: a name, or fn(output, target) -> the SUM
"""

from . import backend, data, models, nn, optim
from .callbacks import Callback, RunStart
from .config import ConfigError, TrainConfig
from .loop import train_local
from .metrics import TrainResult
from .nn import manual_seed
from .sweep import tune
from .tensor import Tensor, concatenate, is_grad_enabled, no_grad, tensor
from .value import Value

__version__ = "0.1.0"


def __getattr__(name):
    # The distributed layer imports Ray; load it only when it is asked for.
    if name in ("Trainer", "distributed"):
        import importlib
        distributed = importlib.import_module(".distributed", __name__)
        return distributed if name == "distributed" else distributed.Trainer
    raise AttributeError(f"module 'dptrain' has no attribute {name!r}")


__all__ = ["backend", "data", "models", "nn", "optim", "Callback", "RunStart", "manual_seed", "ConfigError", "TrainConfig", "TrainResult", "train_local",
           "Tensor", "concatenate", "is_grad_enabled", "no_grad", "tensor", "Value", "Trainer", "tune"]
