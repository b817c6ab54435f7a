"""Data-parallel training on Ray: Worker and ParameterServer actors, and the Trainer that drives them."""

from .actors import NonFiniteError, ParameterServer, Worker, WorkerError, WorkerLost
from .cluster import ClusterError, connect
from .trainer import ServerLost, Trainer, TrainingError

__all__ = ["NonFiniteError", "ParameterServer", "Worker", "WorkerError", "WorkerLost", "ClusterError", "connect",
           "ServerLost", "Trainer", "TrainingError"]
