"""Recovery's policy: what the driver does when a worker, a server shard or the server is lost.

`decide(error, cfg, num_workers, failures)` is a pure function (no Ray, nothing
mutated): it returns a `Recovery`, the value saying what to replace, or raises
TrainingError once the failure budget is spent. `Fleet.recover` (fleet.py) carries it
out: a new worker in the lost one's rank; or the others renumbered to share the batch;
or a new server restored from the newest checkpoint (with a compiled-graph transport
new workers too: Ray keeps the old ones in the dead server's graph); or a new server
shard, and the server restored; then the server is handed its shards and workers and
its transports set up what changed. The steps after the server's state are run again;
every step is a pure function of (parameters, step, data), so the final parameters are
those of a run without the failure.
"""

from __future__ import annotations

import dataclasses

from . import transport
from .errors import ServerLost, ShardLost, TrainingError, WorkerLost

REPLACE_WORKER, SHRINK, REPLACE_SERVER, REPLACE_SHARD = "replace_worker", "shrink", "replace_server", "replace_shard"


@dataclasses.dataclass(frozen=True)
class Recovery:
    """What to do: `action` (one of the four above) on worker rank or shard `index` (None for
    the server); `new_workers`: with a new server, every worker is replaced too."""

    action: str
    index: int | None = None
    new_workers: bool = False

    def describe(self) -> str:
        return {REPLACE_WORKER: f"a new worker {self.index}", SHRINK: f"the other workers take worker {self.index}'s "
                "share", REPLACE_SERVER: "a new parameter server" + (" and new workers" if self.new_workers else ""),
                REPLACE_SHARD: f"a new server shard {self.index}"}[self.action]


def decide(error: WorkerLost | ServerLost, cfg, num_workers: int, failures: int) -> Recovery:
    """The recovery for `error`, the run's `failures`-th (counted already: a loss found while
    recovering from another counts too), with `num_workers` workers now. TrainingError once
    the budget (cfg.max_failures) is spent."""
    if failures > cfg.max_failures:
        where = f"{cfg.out}/checkpoints" if cfg.out and cfg.checkpoint_every else "none kept"
        raise TrainingError(f"{error}; the failure budget (--max-failures {cfg.max_failures}) is spent. "
                            f"Last checkpoint: {where}")
    if isinstance(error, ShardLost):
        return Recovery(REPLACE_SHARD, error.index)
    if isinstance(error, ServerLost):
        return Recovery(REPLACE_SERVER, new_workers=not transport.workers_outlive_server(cfg.transport))
    if cfg.on_worker_loss == "shrink" and num_workers > 1:
        return Recovery(SHRINK, error.rank)
    return Recovery(REPLACE_WORKER, error.rank)
