"""The run's building blocks, shared by the single-process loop (loop.py) and the distributed
layer (distributed/): the data a config names, the checked model and loss, the optimizer
and its schedule, the number of steps.
"""

from __future__ import annotations

import logging

from . import backend
from .config import ConfigError, TrainConfig
from .data import BatchSampler, Dataset, load_dataset
from .models import check, loss_function, model_factory
from .nn import flatten
from .optim import OPTIMIZERS, Optimizer, Schedule

log = logging.getLogger(__name__)


def as_dataset(cfg: TrainConfig, dataset=None) -> Dataset:
    """The run's data: `dataset` as given (a Dataset, or a ray.data.Dataset or a dict of them by
    split, read through Ray Data), or what cfg names (load_data)."""
    from .data import tables
    if dataset is None:
        return load_data(cfg)
    if tables.is_ray_dataset(dataset):
        return tables.from_ray(dataset, cfg.label, cfg.features, cfg.seed)
    return dataset


def load_data(cfg: TrainConfig) -> Dataset:
    if cfg.data is not None:
        return load_dataset(path=cfg.data, seed=cfg.seed, label=cfg.label, features=cfg.features,
                            seq_len=cfg.seq_len, token_dtype=cfg.token_dtype, vocab_size=cfg.vocab_size)
    return load_dataset(cfg.dataset)


def prepare(cfg: TrainConfig, dataset: Dataset, model=None, loss=None, gpus_on_cluster: bool = False) -> tuple:
    """The run's model factory and loss function, checked on the data before anything starts
    (models.check: a failing builder, outputs that do not fit the labels, a loss that is not a
    scalar sum are one ConfigError); so is a GPU run on a machine without one, unless the GPUs
    are a cluster's (`gpus_on_cluster`: the trainer joins one)."""
    factory = model_factory(cfg, dataset, model)
    loss_fn = loss_function(cfg, dataset, loss)
    check(factory, loss_fn, dataset, cfg.seed)
    if cfg.device == "cuda" and not gpus_on_cluster and not backend.gpu_available():
        field, value = ("gpus_per_worker", f"{cfg.gpus_per_worker:g}") if cfg.gpus_per_worker > 0 else \
            ("device", "'cuda'")
        raise ConfigError(f"invalid {field}: {value} (this machine has no GPU that cupy can use; pip install "
                          "'dptrain[gpu]' on a machine with one, or join a cluster with GPUs: --address)", field=field)
    if cfg.batch_size > len(dataset):
        log.warning("--batch-size %d is larger than the %d training examples: every step uses all %d",
                    cfg.batch_size, len(dataset), len(dataset))
    return factory, loss_fn


def build_optimizer(cfg: TrainConfig, params) -> Optimizer:
    """The run's optimizer over `params` (in their order: the flat buffer's). With
    cfg.decay_params "matrices", the parameters of fewer than two dimensions (biases, norms)
    form a group without weight decay."""
    params = list(params)
    if cfg.decay_params == "matrices" and cfg.weight_decay:
        flatten(params)  # one buffer in the model's order first: the groups change no offsets
        params = [{"params": [p for p in params if p.data.ndim >= 2]},
                  {"params": [p for p in params if p.data.ndim < 2], "weight_decay": 0.0}]
        params = [g for g in params if g["params"]]
    if cfg.optimizer == "sgd":
        opt = OPTIMIZERS["sgd"](params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=cfg.weight_decay)
    else:
        opt = OPTIMIZERS[cfg.optimizer](params, lr=cfg.lr, betas=tuple(cfg.betas or (0.9, 0.999)), eps=cfg.eps,
                                        weight_decay=cfg.weight_decay)
    opt.threads = cfg.update_threads or 1  # auto: the server may take more (ParameterServer.set_workers)
    return opt


def total_steps(cfg: TrainConfig, num_examples: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return cfg.epochs * BatchSampler(num_examples, cfg.batch_size).steps_per_epoch


def build_schedule(cfg: TrainConfig, steps: int) -> Schedule:
    return Schedule(cfg.schedule, cfg.lr, total_steps=steps, warmup_steps=cfg.warmup,
                    step_size=cfg.step_size, gamma=cfg.gamma, min_lr=cfg.min_lr)
