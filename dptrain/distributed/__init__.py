"""Data-parallel training on Ray: Worker and ParameterServer actors, and the Trainer that drives them."""

from .actors import ParameterServer, Worker, WorkerError
from .cluster import ClusterError, connect
from .trainer import Trainer, TrainingError

__all__ = ["ParameterServer", "Worker", "WorkerError", "ClusterError", "connect", "Trainer", "TrainingError"]
