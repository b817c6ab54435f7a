"""Data-parallel training on Ray: the Trainer (driver), the Worker and ParameterServer actors, their transports.

    trainer.py    Trainer: runs the step loop from the driver, logs, recovers
    fleet.py      the run's actors on the driver's side: start, connect, call, stop
    recovery.py   replace a lost worker, shrink, replace the server
    server.py     ParameterServer: the update, the step loop, checkpoints
    worker.py     Worker: a replica computing its shard's gradient
    transport/    how steps travel between server and workers (object store; shared memory)
    errors.py     the failure vocabulary (WorkerLost, ServerLost, ...)
    faults.py     fault injection for tests and the soak script
    cluster.py    finding, joining or starting a Ray cluster
"""

from .cluster import ClusterError, connect
from .errors import NonFiniteError, ServerLost, TrainingError, WorkerError, WorkerLost
from .server import ParameterServer
from .trainer import Trainer
from .worker import Worker

__all__ = ["NonFiniteError", "ParameterServer", "Worker", "WorkerError", "WorkerLost", "ClusterError", "connect",
           "ServerLost", "Trainer", "TrainingError"]
