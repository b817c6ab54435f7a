"""Connecting to Ray: an embedded local instance, or a running cluster, failing fast."""

from __future__ import annotations

import logging
import math
import os
import socket
import ray

log = logging.getLogger(__name__)

class ClusterError(RuntimeError):
    """Ray cannot be reached or cannot run this job; the message says why and what to do."""


def resolve_address(address: str) -> str:
    """"auto" or HOST:PORT -> HOST:PORT of the cluster's GCS, or a ClusterError."""
    try:
        from ray._private.services import canonicalize_bootstrap_address  # how ray.init resolves it
        resolved = canonicalize_bootstrap_address(address)
    except ConnectionError as e:
        raise ClusterError(f"--address {address}: no running Ray cluster found ({e}). Start one with "
                           "cluster/start.sh (or `ray start --head`), or leave out --address to run on "
                           "an embedded local Ray") from None
    except Exception as e:
        raise ClusterError(f"--address {address!r} is not a valid Ray address ({e}); expected auto or HOST:PORT") from None
    if resolved is None:
        raise ClusterError(f"--address {address}: no running Ray cluster found")
    return resolved


def check_reachable(address: str, timeout_s: float = 3.0, given: str | None = None) -> None:
    """Open a TCP connection to HOST:PORT; Ray itself would retry for minutes."""
    shown = address if given in (None, address) else f"{given} ({address})"
    host, _, port = address.rpartition(":")
    try:
        port_n = int(port)
    except ValueError:
        raise ClusterError(f"--address {shown}: expected HOST:PORT") from None
    try:
        with socket.create_connection((host.strip("[]"), port_n), timeout=timeout_s):
            pass
    except OSError as e:
        raise ClusterError(f"--address {shown}: no Ray cluster answers there ({e.strerror or e}). "
                           "Is it started (cluster/status.sh)? Is the port the head's GCS port (6379 by default)?") from None


def connect(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """Make sure this process talks to Ray. Returns True if it started (and so owns) the instance.

    - Ray already initialised: use it.
    - An address (or RAY_ADDRESS, as inside `ray job submit`): join that cluster,
      after checking within seconds that something listens there. Clusters started
      by `ray start` in Ray 2.60 use token authentication. Ray turns it on by itself
      for "auto"; for HOST:PORT a client needs RAY_AUTH_MODE=token in its environment
      before Ray is imported (the CLI does that, see cli.use_token_auth_for).
    - Otherwise: start a private local instance (no dashboard).
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    common = {"log_to_driver": True, "logging_level": logging.WARNING, "configure_logging": True}
    if address:
        target = resolve_address(address)
        check_reachable(target, given=address)
        try:
            ray.init(address=address, **common)  # "auto" as such: Ray turns token auth on only for it
        except Exception as e:
            hint = ""
            if os.environ.get("RAY_AUTH_MODE") != "token":
                hint = (" If the cluster uses token authentication (Ray 2.60's default), set "
                        "RAY_AUTH_MODE=token before starting Python (the dptrain CLI does this itself).")
            raise ClusterError(f"--address {address}: could not join the Ray cluster at {target}: "
                               f"{type(e).__name__}: {e}.{hint}") from None
        return True
    cores = os.cpu_count() or 1
    if num_cpus is not None and num_cpus > 2 * cores:
        log.warning("starting a local Ray with %d logical CPUs on this machine's %d cores: the workers share them, "
                    "so a step takes about as long as all of theirs together", num_cpus, cores)
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, **common)
    return True


def embedded_cpus(workers: int, cpus_per_worker: float, requested: int | None) -> int:
    """Logical CPUs for an embedded Ray: enough to place every worker (they may share cores)."""
    if requested is not None:
        return requested
    return max(os.cpu_count() or 1, math.ceil(workers * cpus_per_worker))


def check_resources(workers: int, cpus_per_worker: float, gpus_per_worker: float) -> None:
    """Refuse, with the numbers, a job the cluster can never place (instead of waiting forever)."""
    total = ray.cluster_resources()
    for kind, per in (("CPU", cpus_per_worker), ("GPU", gpus_per_worker)):
        need = workers * per
        have = total.get(kind, 0.0)
        if need > have + 1e-9:
            flag = "--cpus-per-worker" if kind == "CPU" else "--gpus-per-worker"
            raise ClusterError(f"{_n(workers, 'worker')} x {_n(per, kind)} = {_n(need, kind)}, but the Ray cluster "
                               f"has {_n(have, kind)}: lower {flag} or --workers, or add nodes"
                               + (" (or raise --cpus for the embedded Ray)" if kind == "CPU" else ""))


def _n(count: float, what: str) -> str:
    """"1 GPU", "2 GPUs", "0.5 GPU", "3 workers"."""
    return f"{count:g} {what}" + ("" if count <= 1 else "s")


def head_node_id() -> str | None:
    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return node["NodeID"]
    return None
