"""Soak test: train while killing workers, the server and whole nodes, then compare with a clean run.

    python scripts/soak.py                                   # 300 steps, at most 10 minutes
    python scripts/soak.py --steps 1000 --minutes 20 --kill-every 25 --server-every 4 --node-every 3
    python scripts/soak.py --out benchmarks/soak.json

A bounded run (--steps, and --minutes of wall time for the faulty run) on a local
multi-node Ray cluster (ray.cluster_utils.Cluster: a head and one 1-CPU node per worker,
the workers spread over them): every --kill-every steps a fault. Most are a random
worker's process exiting in the middle of its step; every --server-every-th hits the
server instead; every --node-every-th kills a worker's whole node from outside, as a
crashed machine dies (SIGKILL of its worker processes, raylet and object store), and a
fresh node joins, as an autoscaler would add one. A node can take the server with it
(and so count as two failures). The run checkpoints every
--checkpoint-every steps, so a lost server restarts from its newest checkpoint. It
reports steps completed, faults injected and survived, and whether the final parameters
equal those of the same run without faults (float64, 1e-10 relative).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import dptrain as dp  # noqa: E402


def schedule(steps: int, every: int, server_every: int, node_every: int, workers: int, seed: int) -> list:
    """Faults at steps every, 2*every, ...: a node's death every node_every-th, the server's exit every
    server_every-th (a node's death where both fall), a random worker's exit otherwise."""
    rng = random.Random(seed)
    faults = []
    for i, step in enumerate(range(every, steps, every), start=1):
        if node_every and i % node_every == 0:
            faults.append({"role": "node", "step": step})
        elif server_every and i % server_every == 0:
            faults.append({"role": "server", "step": step, "kind": "exit"})
        else:
            faults.append({"rank": rng.randrange(workers), "step": step, "kind": "exit"})
    return faults


def kill_node(cluster, trainer, rng) -> str:
    """SIGKILL every process of the node of a random worker (not the head's), then add a fresh node."""
    nodes = {n.node_id: n for n in cluster.worker_nodes}
    victims = [p for p in trainer.placement if p["node_id"] in nodes]
    if not victims:
        return "no worker on a node that can be killed"
    victim = rng.choice(victims)
    node = nodes[victim["node_id"]]
    pids = [p["pid"] for p in trainer.placement if p["node_id"] == victim["node_id"]]
    pids += [info.process.pid for infos in node.all_processes.values() for info in infos]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cluster.remove_node(node, allow_graceful=False)  # bookkeeping only: its processes are gone
    cluster.add_node(num_cpus=1, wait=False)
    return f"node {victim['node_id'][:8]} of worker {victim['rank']} ({len(pids)} processes)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-time bound of the faulty run")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--kill-every", type=int, default=20, help="steps between faults")
    ap.add_argument("--server-every", type=int, default=4, help="every Nth fault kills the server (0: never)")
    ap.add_argument("--node-every", type=int, default=3, help="every Nth fault kills a worker's node (0: never)")
    ap.add_argument("--checkpoint-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the report as JSON here too")
    args = ap.parse_args(argv)

    faults = schedule(args.steps, args.kill_every, args.server_every, args.node_every, args.workers, args.seed)
    injected = [f for f in faults if f.get("role") != "node"]  # by the library; nodes die from out here
    node_steps = [f["step"] for f in faults if f.get("role") == "node"]
    work = tempfile.mkdtemp(prefix="dptrain-soak-")
    cfg = dp.TrainConfig(dataset="spirals", model=[2, 64, 64, 3], workers=args.workers, batch_size=128,
                         steps=args.steps, dtype="float64", lr=0.05, momentum=0.9, seed=args.seed, log_every=10,
                         checkpoint_every=args.checkpoint_every, max_failures=2 * len(faults) + 1, step_timeout=60,
                         spread=True, out=work)
    import ray
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(args.workers):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="warning", log_to_driver=False)
    cluster.wait_for_nodes()
    deadline = time.monotonic() + 60 * args.minutes
    recoveries, nodes_killed = [], []
    rng = random.Random(args.seed + 1)

    def sink(record):
        if record.get("kind") == "recovery":
            recoveries.append(record)

    def progress(step, record):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the soak run passed its {args.minutes:g}-minute bound at step {step}")
        if node_steps and step >= node_steps[0]:
            node_steps.pop(0)
            nodes_killed.append(kill_node(cluster, trainer, rng))
            print(f"step {step}: killed {nodes_killed[-1]}", flush=True)

    trainer = dp.Trainer(cfg, faults=injected, sink=sink, progress=progress)
    start = time.monotonic()
    error = None
    try:
        faulty = trainer.fit()
    except (dp.distributed.TrainingError, TimeoutError) as e:
        faulty, error = None, str(e)
    wall = time.monotonic() - start
    ray.shutdown()
    cluster.shutdown()
    clean = dp.train_local(cfg.replace(out=None, checkpoint_every=0))
    report = {"command": "python scripts/soak.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "steps_planned": args.steps, "workers": args.workers, "faults_scheduled": len(faults),
              "worker_faults_scheduled": sum(1 for f in faults if "rank" in f),
              "server_faults_scheduled": sum(1 for f in faults if f.get("role") == "server"),
              "node_faults_scheduled": sum(1 for f in faults if f.get("role") == "node"), "nodes_killed": nodes_killed,
              "faults_injected": len(recoveries), "faults_survived": faulty.summary["failures_survived"] if faulty else None,
              "steps_completed": faulty.summary["steps"] if faulty else None, "wall_s": wall, "error": error}
    if faulty:
        diff = max(float(np.abs(faulty.params[k] - clean.params[k]).max() / max(np.abs(clean.params[k]).max(), 1e-300))
                   for k in clean.params)
        report.update(max_relative_difference=diff, matches_fault_free_run=diff < 1e-10,
                      test_accuracy=faulty.summary.get("test_accuracy"))
    for key, value in report.items():
        print(f"{key:>26}: {value}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report.get("matches_fault_free_run") else 1


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    sys.exit(main())
