"""Recovery: what the driver does when a worker or the server is lost, so the run ends as if nothing was.

One path whatever the transports: change the fleet (a new worker in the lost one's
rank; or the others renumbered to share the batch; or a new server restored from
the newest checkpoint; or a new server shard, and the server restored), then
`Fleet.connect` hands the server its shards and workers, and the server's transports
set up what changed. The steps after the server's state are
run again (with a compiled-graph transport a new server gets new workers too: Ray keeps
the old ones in the dead server's graph); every step is a pure function of (parameters, step, data), so the
final parameters are those of a run without the failure.
"""

from __future__ import annotations

import logging

import ray

from . import transport
from .errors import ServerLost, ShardLost, TrainingError, WorkerLost
from .fleet import Fleet

log = logging.getLogger(__name__)


def recover(fleet: Fleet, error: WorkerLost | ServerLost, failures: int, recorded: int) -> None:
    """Replace what was lost (ShardLost is a ServerLost); `failures` counts it already (a loss
    found while recovering from another counts too). TrainingError once the budget is spent.
    `recorded`: the steps logged so far (a new server restores a checkpoint of at most that many)."""
    cfg = fleet.cfg
    if failures > cfg.max_failures:
        where = f"{cfg.out}/checkpoints" if cfg.out and cfg.checkpoint_every else "none kept"
        raise TrainingError(f"{error}; the failure budget (--max-failures {cfg.max_failures}) is spent. "
                            f"Last checkpoint: {where}")
    log.warning("%s; recovering (failure %d of at most %d)", error, failures, cfg.max_failures)
    if isinstance(error, ShardLost):
        replace_shard(fleet, error.index, recorded)
    elif isinstance(error, ServerLost):
        replace_server(fleet, recorded)
    elif cfg.on_worker_loss == "shrink" and len(fleet.workers) > 1:
        shrink(fleet, error.rank)
    else:
        replace_worker(fleet, error.rank)
    fleet.connect()


def replace_worker(fleet: Fleet, rank: int) -> None:
    """A new worker `rank`, started and answering, in the lost one's place."""
    ray.kill(fleet.workers[rank])
    fleet.workers[rank], fleet.placement[rank] = fleet.start_actor(
        f"worker {rank}", lambda: fleet.spawn_worker(rank, len(fleet.workers)), lambda actor: actor.ready.remote(),
        "no free resources left? --on-worker-loss shrink goes on without it")


def shrink(fleet: Fleet, rank: int) -> None:
    """Go on without worker `rank`: the others take its share of every global batch."""
    ray.kill(fleet.workers.pop(rank))
    fleet.placement.pop(rank)
    for new_rank, where in enumerate(fleet.placement):  # the server tells the workers (Fleet.connect)
        where["rank"] = new_rank


def replace_shard(fleet: Fleet, index: int, recorded: int) -> None:
    """A new server shard `index`; the server (alive) restores the newest checkpoint of at most
    `recorded` steps (or the initial state) and, in Fleet.connect, gives every shard its range
    of it: the shards' ranges are one step's again, and the steps after it run again."""
    ray.kill(fleet.shards[index])
    fleet.shards[index], fleet.shard_nodes[index] = fleet.start_actor(
        f"server shard {index}", lambda: fleet.spawn_shard(index), lambda actor: actor.ready.remote())
    log.info("a new server shard %d runs on node %s", index, fleet.shard_nodes[index][:8])
    fleet.restore(required=False, max_step=recorded)


def replace_server(fleet: Fleet, recorded: int) -> None:
    """A new server from the newest checkpoint (or the initial parameters): lost steps are replayed.

    Only checkpoints of at most `recorded` steps qualify: the steps after them are run again,
    so their metrics reach the log even if the old server died before sending them.
    """
    ray.kill(fleet.ps)
    fleet.ps, node = fleet.start_actor("the parameter server", fleet.spawn_server, lambda actor: actor.ready.remote())
    log.info("a new parameter server runs on node %s", node[:8])
    fleet.restore(required=False, max_step=recorded)
    if not transport.workers_outlive_server(fleet.cfg.transport):
        for rank in range(len(fleet.workers)):
            replace_worker(fleet, rank)
