"""dptrain: data-parallel training on Ray with a small autograd engine of its own.

    import dptrain as dp
    model = dp.nn.MLP([40, 256, 256, 10])
    result = dp.Trainer(dp.TrainConfig(dataset="mnist1d", workers=4)).fit()
"""

from . import backend, data, nn, optim
from .config import ConfigError, TrainConfig
from .loop import TrainResult, train_local
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


__all__ = ["backend", "data", "nn", "optim", "ConfigError", "TrainConfig", "TrainResult", "train_local",
           "Tensor", "concatenate", "is_grad_enabled", "no_grad", "tensor", "Value", "Trainer"]
