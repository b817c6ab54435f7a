"""Optimizers (torch.optim-like) and learning-rate schedules."""

from .optimizers import OPTIMIZERS, SGD, Adam, AdamW, Optimizer, adam_update, sgd_update
from .schedules import SCHEDULES, Schedule

__all__ = ["OPTIMIZERS", "SGD", "Adam", "AdamW", "Optimizer", "adam_update", "sgd_update", "SCHEDULES",
           "Schedule"]
