"""The processes of a run's actors: which one an actor is, and ending one that no longer answers.

`ray.kill` asks a killed actor's process to exit and sends it SIGKILL only if it has not done so
within Ray's `kill_worker_timeout_milliseconds` (5 s in Ray 2.60). A frozen process (SIGSTOP, a
debugger, a machine paused under its raylet) never answers, so for those 5 s it keeps its
resources (a replacement worker waits for its CPU in the placement group) and its sockets (the
workers wait on a frozen server's channel). Every actor says which process it is when it starts
(`identity`), and the driver ends the process of one it gives up on at once (`end`): itself when
the process runs on the driver's node, by a task pinned to the process's node otherwise. (A
process is named by its pid and start time, from /proc: where there is none, as on macOS, the
driver leaves the kill to Ray.)
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)


def node_id() -> str:
    """The Ray node this process runs on ("local" outside Ray: the actors are plain classes too)."""
    try:
        import ray
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return "local"


def start_time(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (/proc/PID/stat's 22nd field; None: no
    such process). With the pid it names one process: a pid is reused, the pair is not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[19])  # fields after the command's name start at the 3rd


def identity() -> dict:
    """This process: {"pid", "started", "node_id"} (`end`'s argument)."""
    return {"pid": os.getpid(), "started": start_time(os.getpid()), "node_id": node_id()}


def kill_if_same(pid: int, started: int | None) -> bool:
    """SIGKILL process `pid` if it is still the one that started at `started` (a process that has
    exited, or a pid given to another process since, is left alone); whether it was sent."""
    if started is None or start_time(pid) != started:
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:  # gone meanwhile, or not ours
        return False
    return True


def end(process: dict | None) -> None:
    """End `process` (an actor's `identity`) at once if it still runs, after ray.kill of its actor:
    directly when it is on the driver's node, else by a task on its node (not waited for: a node
    that died with it runs nothing, and Ray then frees what it held anyway)."""
    if not process or process.get("pid") is None:
        return
    if process["node_id"] == node_id():
        kill_if_same(process["pid"], process["started"])
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    try:
        _kill_task().options(scheduling_strategy=NodeAffinitySchedulingStrategy(process["node_id"], soft=False)).remote(
            process["pid"], process["started"])
    except Exception as e:  # the node is unknown by now: Ray ends what ran there
        log.debug("cannot reach node %s to end process %s: %s", process["node_id"], process["pid"], e)


_task = None


def _kill_task():
    """kill_if_same as a Ray task that reserves nothing (made on first use: importing this module
    needs no Ray)."""
    global _task
    if _task is None:
        import ray
        _task = ray.remote(num_cpus=0, max_retries=0)(kill_if_same)
    return _task
