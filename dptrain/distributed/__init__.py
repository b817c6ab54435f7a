"""Data-parallel training on Ray: the Trainer (driver), the Worker and ParameterServer actors, their transports.

    trainer.py    Trainer: runs the step loop from the driver, logs, recovers
    fleet.py      the run's actors on the driver's side: start, connect, call, recover, stop
    recovery.py   the recovery policy: what to replace after a loss (a value; no Ray)
    server.py     ParameterServer: drives the step loop, checkpoints, heartbeat
    update.py     the update seam: LocalUpdate (the server applies it)
    shards.py     ShardedUpdate and ServerShard (--servers K)
    loops.py      the step-loop seam: Synchronous
    relaxed.py    Relaxed (--staleness, --backup-workers)
    worker.py     Worker: a replica computing its shard's gradient (one entry point, compute)
    messages.py   Request, Gradient, SegmentSpec, ServerView: what crosses the seams
    transport/    how steps travel between server and workers (object store, shared memory,
                  compiled graph; control.py the shared-memory workers' control channel)
    errors.py     the failure vocabulary (WorkerLost, ServerLost, ...), and Ray's errors translated
    faults.py     fault injection for tests and the soak script
    cluster.py    finding, joining or starting a Ray cluster
"""

import importlib

# Loaded on first use: a worker or server process imports only its own module, not the
# driver's (Trainer, placement groups), which shortens every actor's start.
_EXPORTS = {"ClusterError": ".cluster", "connect": ".cluster", "NonFiniteError": ".errors", "ServerLost": ".errors",
            "TrainingError": ".errors", "WorkerError": ".errors", "WorkerLost": ".errors",
            "ParameterServer": ".server", "Trainer": ".trainer", "Worker": ".worker"}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
