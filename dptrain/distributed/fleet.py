"""The run's actors on the driver's side: starting them, connecting them, calling them, stopping them.

`Fleet` spawns the parameter server (pinned to the live head node, next to the
driver), its shards with --servers K > 1 (one per live node, round robin) and the
workers (in a SPREAD placement group with `spread`). Inside a placement group of its
own caller's (a Ray Tune trial's, sweep.trial_resources: bundle 0 for the driver and
the server, one per worker after it) every actor goes into that group instead: the
server, its shards and the heartbeat's Watch into bundle 0, worker r into bundle r + 1.
It waits until
they answer, checks that every worker built the server's model, and hands the
server its workers and where they run (`connect`): the server's transports do the
rest. The driver's calls to the server go through `server_call`, which turns Ray's
errors into the failure vocabulary (errors.py) with deadlines: no call waits forever.
`recover` carries out what recovery.py decided after a loss.
"""

from __future__ import annotations

import logging
import time
import uuid

import ray
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from ..config import ConfigError, TrainConfig
from ..models import first_difference
from . import transport
from .cluster import head_node_id, live_node_ids
from . import processes, recovery
from .errors import (NonFiniteError, ServerLost, ShardLost, TrainingError, WorkerError, WorkerLost, is_timeout,
                     lost_cause, unwrap)
from .server import ParameterServer, Watch
from .shards import ServerShard
from .worker import Worker

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0  # actors (and placement groups) that cannot start within this are an error
WAIT_NOTICE_S = 5.0  # after this long waiting for them, say so
HEARTBEAT_SLACK_S = 10.0  # a server is lost after step_timeout + this without progress or an answer
# ... and after its step timeout, within these bounds, without any heartbeat (sent every second from
# a thread of its own, whatever the step loop does: silence is a frozen or cut-off process)
SILENCE_BOUNDS_S = (10.0, 30.0)


def silence_limit(step_timeout: float) -> float:
    """Seconds without a heartbeat after which the server is lost: its step timeout, at least 10 s
    (the Watch's start and the server's lookup of it) and at most 30 s (a frozen machine is found
    within 30 s whatever --step-timeout, 300 s by default)."""
    low, high = SILENCE_BOUNDS_S
    return min(max(float(step_timeout), low), high)


class Fleet:
    """The parameter server and the workers of one run. `faults` (tests, scripts/soak.py) makes
    them the fault-injecting subclasses of faults.py."""

    def __init__(self, cfg: TrainConfig, factory, loss_fn, data_ref, total_steps: int, steps_per_epoch: int,
                 run_key: str, faults: list | None = None):
        self.cfg, self.factory, self.loss_fn, self.data_ref = cfg, factory, loss_fn, data_ref
        self.total_steps, self.steps_per_epoch, self.run_key = total_steps, steps_per_epoch, run_key
        self.faults = faults
        if faults:
            from . import faults as fault_injection
            fault_injection.check(faults)
        self.trial_pg = get_current_placement_group()  # a Tune trial's: the run's actors go there
        self.ps = None
        self.workers: list = []
        self.shards: list = []  # --servers K > 1: the server shards, by index
        self.shard_processes: list = []  # each shard's process (processes.identity: pid, started, node_id)
        self.server_process: dict | None = None  # the server's
        self.placement: list = []  # where each worker runs: rank, device and its process's identity
        self.carried: dict = {}  # transport name -> ranks, as the server set them up
        self.update_threads = 1  # the server's update's threads, as it chose them (--update-threads auto)
        self.pg = None
        self.watch = None  # the server's heartbeat arrives here (server.Watch), once a call waits long
        self.watch_name = f"dptrain-watch-{run_key}-{uuid.uuid4().hex[:8]}"
        self.submitted = -1  # the last step handed to the server: later faults are still to come

    @property
    def shard_nodes(self) -> list:
        """The node each shard runs on."""
        return [p["node_id"] for p in self.shard_processes]

    @property
    def shared(self) -> list:
        """Ranks of the workers on shared memory."""
        return self.carried.get(transport.SHARED_MEMORY, [])

    # ------------------------------------------------------------------ spawning

    def _remaining_faults(self) -> list | None:
        """Injected faults not yet reached: a replacement must not fire the one that killed its predecessor."""
        if not self.faults:
            return None
        from .faults import pending
        return pending(self.faults, self.submitted)

    def spawn_worker(self, rank: int, num_workers: int):
        cfg = self.cfg
        opts = {"num_cpus": cfg.cpus_per_worker, "num_gpus": cfg.gpus_per_worker}
        if self.trial_pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.trial_pg,
                                                                           placement_group_bundle_index=rank + 1)
        elif self.pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank)
        args = (cfg.to_dict(), self.factory, self.loss_fn, self.data_ref, rank, num_workers)
        if self.faults:
            from .faults import FaultyWorker
            return ray.remote(FaultyWorker).options(**opts).remote(*args, faults=self._remaining_faults())
        return ray.remote(Worker).options(**opts).remote(*args)

    def _beside_driver(self) -> dict:
        """Where the server and what goes with it run: the trial's bundle 0, or else pinned to the
        (live) head node, next to the driver. Not soft: Ray then placed the server on a worker node
        now and then, and that node's loss took it along. It needs no CPU, so it always fits."""
        if self.trial_pg is not None:
            return {"scheduling_strategy": PlacementGroupSchedulingStrategy(self.trial_pg,
                                                                            placement_group_bundle_index=0)}
        head = head_node_id()
        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(head, soft=False)} if head is not None else {}

    def spawn_server(self):
        opts = {"num_cpus": 0, **self._beside_driver()}
        args = (self.cfg.to_dict(), self.factory, self.total_steps, self.steps_per_epoch, self.run_key,
                self.watch_name)
        if self.faults:
            from .faults import FaultyServer
            cls = FaultyServer
        else:
            cls = ParameterServer
        actor = ray.remote(cls).options(**opts)
        if self.watch is not None:  # a new server starts with a fresh beat (the driver's later
            self.watch.beat.remote(0, 0.0)  # reads queue behind this call)
        return actor.remote(*args, faults=self._remaining_faults()) if self.faults else actor.remote(*args)

    def spawn_shard(self, index: int):
        """Server shard `index` (--servers K > 1): no CPU reserved, like the server, and spread over
        the live nodes, the head's first (shard j on the j-th, round robin), so that on a cluster
        the shards' links are different nodes' links. (Ray's "SPREAD" strategy put actors that
        reserve nothing all on one node, and a soft affinity often did too.) A node that died
        unnoticed fails the shard's start, and start_actor tries again on the nodes then alive."""
        nodes = live_node_ids()
        opts = {"num_cpus": 0}
        if self.trial_pg is not None:  # the trial's group holds the run
            opts.update(self._beside_driver())
        elif nodes:
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(nodes[index % len(nodes)], soft=False)
        if self.faults:
            from .faults import FaultyShard
            return ray.remote(FaultyShard).options(**opts).remote(self.cfg.to_dict(), index,
                                                                  faults=self._remaining_faults())
        return ray.remote(ServerShard).options(**opts).remote(self.cfg.to_dict(), index)

    def _watch(self):
        """The server's heartbeat Watch, made on first need (a call that waits long)."""
        if self.watch is None:
            opts = {"num_cpus": 0, "name": self.watch_name, **self._beside_driver()}
            self.watch = ray.remote(Watch).options(**opts).remote()
        return self.watch

    def start(self) -> list:
        """Spawn everything and wait until it answers; the model's layout."""
        cfg = self.cfg
        if cfg.spread and self.trial_pg is None:  # in a trial, the trial's group is spread (or not)
            self.pg = self._reserve_spread()
        self.workers = [self.spawn_worker(rank, cfg.replicas) for rank in range(cfg.replicas)]
        self.ps = self.spawn_server()
        self.shards = [self.spawn_shard(j) for j in range(cfg.servers)] if cfg.servers > 1 else []
        return self._wait_ready()

    def _reserve_spread(self):
        cfg = self.cfg
        bundle = {"CPU": max(cfg.cpus_per_worker, 0.01)}
        if cfg.gpus_per_worker:
            bundle["GPU"] = cfg.gpus_per_worker
        pg = placement_group([dict(bundle) for _ in range(cfg.replicas)], strategy="SPREAD")
        try:
            ready, _ = ray.wait([pg.ready()], timeout=WAIT_NOTICE_S)
            if not ready:
                log.warning("waiting for the cluster to reserve %d x %s across its nodes; giving up after %.0f s",
                            cfg.replicas, bundle, READY_TIMEOUT_S)
            ray.get(pg.ready(), timeout=READY_TIMEOUT_S - WAIT_NOTICE_S)
        except Exception as e:
            if not is_timeout(e):
                raise
            remove_placement_group(pg)
            raise TrainingError(f"could not reserve {cfg.replicas} x {bundle} across the cluster's nodes "
                                f"within {READY_TIMEOUT_S:.0f} s (its resources are taken?)") from None
        return pg

    def _wait_ready(self) -> list:
        refs = [w.ready.remote() for w in self.workers]
        shards = [s.ready.remote() for s in self.shards]
        server = self.ps.ready.remote()
        everything = refs + [server] + shards  # an actor has started once it answers
        ready, pending = ray.wait(everything, num_returns=len(everything), timeout=WAIT_NOTICE_S)
        if pending:  # a busy cluster: say so while waiting
            log.warning("waiting for the cluster to start %d of %d actors (its resources are taken?); giving up "
                        "after %.0f s", len(pending), len(everything), READY_TIMEOUT_S)
            ready, pending = ray.wait(everything, num_returns=len(everything), timeout=READY_TIMEOUT_S - WAIT_NOTICE_S)
        if pending:
            names = [f"worker {refs.index(r)}" if r in refs else f"server shard {shards.index(r)}" if r in shards
                     else "parameter server" for r in pending]
            raise TrainingError(f"{', '.join(names)} did not start within {READY_TIMEOUT_S:.0f} s: the cluster "
                                "has no free resources for them (cluster/status.sh shows what is running)")
        try:
            self.placement = ray.get(refs)
            self.shard_processes = ray.get(shards)
            self.server_process = ray.get(server)
        except Exception as e:  # (Ray's errors: a worker's constructor failed)
            raise TrainingError(f"a worker failed to start: {unwrap(e)}") from None
        server = ray.get(self.ps.get_layout.remote())
        for rank, theirs in enumerate(ray.get([w.layout.remote() for w in self.workers])):
            diff = first_difference(server, theirs)
            if diff is not None:
                raise ConfigError(f"invalid model: worker {rank} built another model than the server ({diff}, the "
                                  "server's first): the builder must give the same names and shapes every time",
                                  field="model")
        return server

    def start_actor(self, what: str, spawn, probe, hint: str = ""):
        """(actor, answer to `probe`) of a replacement actor that started; TrainingError if none can in time.

        A worker goes into the lost one's placement-group bundle (or anywhere, without one), the
        server next to the driver where it can. When a whole node died, Ray may still place the
        replacement there until it has noticed the node's death (missed heartbeats, some seconds)
        and moved the bundle to a live node: such a replacement dies before it runs, and another
        is started, until READY_TIMEOUT_S.
        """
        deadline = time.monotonic() + READY_TIMEOUT_S
        tries = 0
        while True:
            tries += 1
            actor = spawn()
            try:
                return actor, ray.get(probe(actor), timeout=max(deadline - time.monotonic(), 1.0))
            except Exception as e:
                ray.kill(actor)
                if is_timeout(e):
                    raise TrainingError(f"no replacement for {what} could start within {READY_TIMEOUT_S:.0f} s"
                                        + (f" ({hint})" if hint else "")) from None
                if lost_cause(e) is None:
                    raise
                reason = str(e).split("The actor died because", 1)[-1].splitlines()[0].strip(" .")
                if time.monotonic() + 1.0 > deadline:
                    raise TrainingError(f"no replacement for {what} could start within {READY_TIMEOUT_S:.0f} s "
                                        f"({tries} tries; the last died: {reason})") from None
                log.warning("the replacement for %s died before it ran (%s); trying again", what, reason)
                time.sleep(1.0)

    # ------------------------------------------------------------------ connecting and calling

    def connect(self) -> None:
        """Hand the server its shards (--servers K > 1) and its workers and where they run: its
        transports set them up."""
        if self.shards:
            self.server_call(self.ps.set_shards.remote(self.shards), self.submitted)
        setup = self.server_call(self.ps.set_workers.remote(self.workers, self.placement), self.submitted)
        self.carried, self.update_threads = setup["transports"], setup["update_threads"]

    def server_step(self) -> int:
        """The server's step: the next it will run."""
        return self.server_call(self.ps.current_step.remote(), -1)

    def server_call(self, ref, step: int):
        """ray.get of a server call, failures turned into WorkerLost / ServerLost (recoverable) or
        TrainingError. No call waits forever: while it runs, the server's heartbeat (sent from a
        thread of its own to `watch`) must keep coming, at least every silence_limit(step_timeout)
        seconds, and show progress of the step loop within step_timeout + HEARTBEAT_SLACK_S; past
        either the server is frozen or hung, so it is killed and replaced from its checkpoint."""
        limit = self.cfg.step_timeout + HEARTBEAT_SLACK_S
        silent = silence_limit(self.cfg.step_timeout)
        while not ray.wait([ref], timeout=min(5.0, silent / 3))[0]:
            try:
                beat = ray.get(self._watch().read.remote(), timeout=limit)
            except Exception as e:
                if is_timeout(e):  # the Watch itself is slow to start: ask again
                    continue
                raise
            if beat["age_s"] > silent or beat["idle_s"] > limit:
                if ray.wait([ref], timeout=0)[0]:
                    break  # it answered after all
                self._kill(self.ps, self.server_process)
                why = (f"no heartbeat for {beat['age_s']:.0f} s" if beat["age_s"] > silent else
                       f"no progress for {beat['idle_s']:.0f} s at step {beat['step']}")
                raise ServerLost(step, f"{why} (hung?)")
        try:
            return ray.get(ref)
        except Exception as e:
            cause = unwrap(e)
            if isinstance(cause, (WorkerLost, ShardLost)):
                raise cause from None
            if lost_cause(cause) is not None:  # the server's process died
                raise ServerLost(step, str(cause).splitlines()[0] if cause is not e else type(e).__name__) from None
            if isinstance(cause, (WorkerError, NonFiniteError)):
                raise TrainingError(str(cause)) from None
            raise TrainingError(f"step {step}: {type(cause).__name__}: {cause}") from None

    def restore(self, required: bool, max_step: int | None = None) -> int:
        """Load the newest intact checkpoint (of at most `max_step` steps) into the server; returns
        its step (0: none, start over)."""
        try:
            step = self.server_call(self.ps.restore_checkpoint.remote(None, max_step), -1)
        except TrainingError as e:
            raise TrainingError(f"cannot resume: {e}") from None
        if step is None:
            if required:
                folder = f"{self.cfg.out}/checkpoints" if self.cfg.out else "(no --out)"
                raise TrainingError(f"cannot resume: no intact checkpoint in {folder}")
            return 0
        log.info("restored the checkpoint of step %d", step)
        return step

    # ------------------------------------------------------------------ recovering

    def recover(self, decision: recovery.Recovery, recorded: int) -> None:
        """Carry out recovery.decide's `decision`, then hand the server its shards and workers.
        `recorded`: the steps logged so far (a restored server restores a checkpoint of at most
        that many, so the steps after it are run again and logged)."""
        if decision.action == recovery.SHRINK:
            self._shrink(decision.index)
        elif decision.action == recovery.REPLACE_SHARD:
            self._replace_shard(decision.index, recorded)
        elif decision.action == recovery.REPLACE_SERVER:
            self._replace_server(recorded)
            if decision.new_workers:
                for rank in range(len(self.workers)):
                    self._replace_worker(rank)
        else:
            self._replace_worker(decision.index)
        self.connect()

    @staticmethod
    def _kill(actor, process: dict | None) -> None:
        """ray.kill of an actor given up on, and its process ended at once (processes.end: Ray
        would wait 5 s for a frozen one to exit, holding its resources and sockets)."""
        ray.kill(actor)
        processes.end(process)

    def _replace_worker(self, rank: int) -> None:
        """A new worker `rank`, started and answering, in the lost one's place."""
        self._kill(self.workers[rank], self.placement[rank])
        self.workers[rank], self.placement[rank] = self.start_actor(
            f"worker {rank}", lambda: self.spawn_worker(rank, len(self.workers)), lambda actor: actor.ready.remote(),
            "no free resources left? --on-worker-loss shrink goes on without it")

    def _shrink(self, rank: int) -> None:
        """Go on without worker `rank`: the others take its share of every global batch."""
        self._kill(self.workers.pop(rank), self.placement.pop(rank))
        for new_rank, where in enumerate(self.placement):  # the server tells the workers (connect)
            where["rank"] = new_rank

    def _replace_shard(self, index: int, recorded: int) -> None:
        """A new server shard `index`; the server (alive) restores the newest checkpoint of at most
        `recorded` steps (or the initial state) and, in connect, gives every shard its range of
        it: the shards' ranges are one step's again, and the steps after it run again."""
        self._kill(self.shards[index], self.shard_processes[index])
        self.shards[index], self.shard_processes[index] = self.start_actor(
            f"server shard {index}", lambda: self.spawn_shard(index), lambda actor: actor.ready.remote())
        log.info("a new server shard %d runs on node %s", index, self.shard_nodes[index][:8])
        self.restore(required=False, max_step=recorded)

    def _replace_server(self, recorded: int) -> None:
        """A new server from the newest checkpoint of at most `recorded` steps (or the initial
        parameters): the steps after it run again, so their metrics reach the log even if the
        old server died before sending them."""
        self._kill(self.ps, self.server_process)
        self.ps, self.server_process = self.start_actor("the parameter server", self.spawn_server,
                                                        lambda actor: actor.ready.remote())
        log.info("a new parameter server runs on node %s", self.server_process["node_id"][:8])
        self.restore(required=False, max_step=recorded)

    # ------------------------------------------------------------------ stopping

    def stop(self) -> None:
        """Let the actors release their shared-memory segments and exit, kill what is left, free the
        placement group. The server exits rather than being killed: the semaphores Ray made for a
        compiled graph's channels in its process (/dev/shm/sem.*) are removed only by its exit."""
        actors = self.workers + self.shards + ([self.ps] if self.ps is not None else [])
        try:
            ray.wait([a.close.remote() for a in actors], num_returns=len(actors), timeout=10)
            if self.ps is not None:
                ray.wait([self.ps.__ray_terminate__.remote()], timeout=5)  # answered when its process has gone
        except Exception:  # a dead actor cannot clean up: its process exit unmaps, the driver unlinks
            pass
        for actor in actors + ([self.watch] if self.watch is not None else []):
            ray.kill(actor)
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None
