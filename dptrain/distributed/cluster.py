"""Connecting to Ray: an embedded local instance, or a running cluster, failing fast."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
import threading

import ray

from ..auth import TOKEN_FILE, keep_token_private, token_found, use_token_auth_for

log = logging.getLogger(__name__)

class ClusterError(RuntimeError):
    """Ray cannot be reached or cannot run this job; the message says why and what to do."""


STATE_DIR = "/tmp/dptrain-ray"  # cluster/start.sh's default --state (DPTRAIN_RAY_STATE overrides)


def started_cluster() -> str | None:
    """The GCS address of the cluster cluster/start.sh started (its state folder's env file), if
    it is running; else None."""
    state = os.environ.get("DPTRAIN_RAY_STATE") or STATE_DIR
    try:
        text = open(os.path.join(state, "env")).read()
        sid = int(open(os.path.join(state, "head.sid")).read().strip())
    except (OSError, ValueError):
        return None
    try:
        os.killpg(sid, 0)  # the head node's processes are alive
    except (ProcessLookupError, PermissionError):
        return None
    for line in text.splitlines():
        if line.startswith("export RAY_ADDRESS="):
            return line.split("=", 1)[1].strip() or None
    return None


def resolve_address(address: str) -> tuple[str, str]:
    """"auto" or HOST:PORT -> (HOST:PORT of the cluster's GCS, how it was found), or a ClusterError.

    "auto", in this order: RAY_ADDRESS; the cluster cluster/start.sh started (its state
    folder: $DPTRAIN_RAY_STATE or /tmp/dptrain-ray); the cluster of the last `ray start`
    (Ray's own hint file); the one Ray instance running on this machine. Several instances
    and no hint is an error naming them: Ray alone would pick one of them.
    """
    # Ray has no public API for finding running instances: its own `ray.init("auto")` uses
    # these helpers of ray._private.services (the hint file `ray start` writes, and a scan of
    # this machine's gcs_server processes); they are the only private names dptrain uses.
    from ray._private import services
    how = "given"
    if address == "auto":
        found = os.environ.get("RAY_ADDRESS") or None
        how = "RAY_ADDRESS"
        if found is None:
            found, how = started_cluster(), "cluster/start.sh"
        if found is None:
            hint = services.find_bootstrap_address(None)
            if hint and _answers(hint):  # the file outlives the cluster that wrote it
                found, how = hint, "the last ray start"
        if found is None:
            running = sorted(services.find_gcs_addresses())
            if len(running) > 1:
                raise ClusterError(f"--address auto: {len(running)} Ray instances run on this machine "
                                   f"({', '.join(running)}) and none was started by cluster/start.sh: give "
                                   "--address HOST:PORT")
            if not running:
                raise ClusterError("--address auto: no running Ray cluster found. Start one with cluster/start.sh "
                                   "(or `ray start --head`), or leave out --address to run on an embedded local Ray")
            found, how = running[0], "the only Ray instance running here"
        address = found
    return _canonical(address), how


def _canonical(address: str) -> str:
    """HOST:PORT with the host resolved to an IP address (Ray's GCS address form)."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError(f"--address {address!r} is not a valid Ray address; expected auto or HOST:PORT")
    try:
        ip = socket.gethostbyname(host)
    except OSError as e:
        raise ClusterError(f"--address {address!r}: cannot resolve host {host!r} ({e})") from None
    return f"{ip}:{int(port)}"


def _answers(address: str, timeout_s: float = 1.0) -> bool:
    try:
        check_reachable(address, timeout_s)
        return True
    except ClusterError:
        return False


# A client's HTTP/2 connection preface and an empty SETTINGS frame (RFC 9113, 3.4 and 6.5). Ray's
# GCS is a gRPC server: it answers with a SETTINGS frame of its own, whatever its authentication.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_HTTP2_SETTINGS = 4


def check_reachable(address: str, timeout_s: float = 3.0, given: str | None = None) -> None:
    """Check within seconds that a Ray GCS answers at HOST:PORT: a TCP connection, then the start
    of gRPC's HTTP/2 handshake. Ray itself would retry for minutes, and for ever at a port where
    another service listens."""
    shown = address if given in (None, address) else f"{given} ({address})"
    host, _, port = address.rpartition(":")
    try:
        port_n = int(port)
    except ValueError:
        raise ClusterError(f"--address {shown}: expected HOST:PORT") from None
    try:
        with socket.create_connection((host.strip("[]"), port_n), timeout=timeout_s) as sock:
            reply = _http2_reply(sock, timeout_s)
    except OSError as e:
        raise ClusterError(f"--address {shown}: no Ray cluster answers there ({e.strerror or e}). "
                           "Is it started (cluster/status.sh)? Is the port the head's GCS port (6379 by default)?") from None
    if reply is None or len(reply) < 9 or reply[3] != _HTTP2_SETTINGS:
        said = (f"it said nothing within {timeout_s:g} s" if reply is None
                else "it closed the connection" if not reply.strip()
                else f"it answered {reply[:40].decode('latin-1').splitlines()[0]!r}")
        raise ClusterError(f"--address {shown}: something listens there, but not a Ray cluster's GCS (it does not "
                           f"speak gRPC: {said}). Give the head's GCS port (6379 by default; cluster/status.sh "
                           "prints it), not the dashboard's or another service's")


def _http2_reply(sock: socket.socket, timeout_s: float) -> bytes | None:
    """The first bytes (up to a frame header's 9) a server sends back after a client's HTTP/2
    preface; None if it sends nothing within `timeout_s`."""
    sock.sendall(_HTTP2_PREFACE)
    sock.settimeout(timeout_s)
    reply = b""
    try:
        while len(reply) < 9:
            chunk = sock.recv(64)
            if not chunk:
                break
            reply += chunk
    except socket.timeout:
        return reply or None
    except ConnectionResetError:
        pass
    return reply


def starts_local(address: str | None) -> bool:
    """Whether connect(address) would start a private local instance: Ray not yet initialised
    in this process, and neither an address nor RAY_ADDRESS to join."""
    return not ray.is_initialized() and not (address or os.environ.get("RAY_ADDRESS"))


def connect(address: str | None, num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """Make sure this process talks to Ray. Returns True if it started (and so owns) the instance.

    - Ray already initialised: use it.
    - An address (or RAY_ADDRESS, as inside `ray job submit`): join that cluster,
      after checking within seconds that something listens there. Clusters started
      by `ray start` in Ray 2.60 use token authentication. Ray turns it on by itself
      for "auto"; for HOST:PORT a client needs RAY_AUTH_MODE=token in its environment
      before Ray is imported (the CLI does that: auth.use_token_auth_for).
    - Otherwise: start a private local instance (no dashboard).
    """
    if ray.is_initialized():
        return False
    from_env = not address and bool(os.environ.get("RAY_ADDRESS"))  # as inside `ray job submit`, or exported
    address = address or os.environ.get("RAY_ADDRESS") or None
    common = {"log_to_driver": True, "logging_level": logging.WARNING, "configure_logging": True}
    if address:
        target, how = resolve_address(address)
        check_reachable(target, given=address)
        mode = os.environ.get("RAY_AUTH_MODE")
        if (mode == "token" or (address == "auto" and mode != "disabled")) and not token_found():
            raise ClusterError(f"--address {address}: the cluster at {target} needs its authentication token, and "
                               f"there is none here: copy the head's {TOKEN_FILE} to this user's {TOKEN_FILE} (or "
                               "set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH); RAY_AUTH_MODE=disabled for a cluster "
                               "without tokens")
        if address == "auto":  # Ray resolves "auto" again in ray.init: make it find this cluster
            os.environ["RAY_ADDRESS"] = target  # which Ray counts as explicit: so its token is asked for here
            use_token_auth_for(target)
        try:
            with _callers_sigterm_kept():
                ray.init(address=address, **common)  # "auto" as such: Ray turns token auth on only for it
        except Exception as e:
            hint = ""
            if os.environ.get("RAY_AUTH_MODE") != "token":
                hint = (" If the cluster uses token authentication (Ray 2.60's default), set "
                        "RAY_AUTH_MODE=token before starting Python (the dptrain CLI does this itself).")
            raise ClusterError(f"--address {address}: could not join the Ray cluster at {target}: "
                               f"{type(e).__name__}: {e}.{hint}") from None
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        total = ray.cluster_resources()
        log.info("joined the Ray cluster at %s (%s): %d node(s), %g CPUs, %g GPUs", target,
                 "RAY_ADDRESS" if from_env else "--address" if how == "given" else f"--address auto: {how}",
                 len(nodes), total.get("CPU", 0),
                 total.get("GPU", 0))
        return True
    running = started_cluster()
    if running:
        log.info("no --address: starting a private local Ray (the cluster cluster/start.sh started, at %s, is not "
                 "used; --address auto joins it)", running)
    cores = os.cpu_count() or 1
    if num_cpus is not None and num_cpus > 2 * cores:
        log.warning("starting a local Ray with %d logical CPUs on this machine's %d cores: the workers share them, "
                    "so a step takes about as long as all of theirs together", num_cpus, cores)
    keep_token_private()  # the token Ray may generate now is this user's only
    with _callers_sigterm_kept():
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, **common)
    keep_token_private()
    return True


@contextlib.contextmanager
def _callers_sigterm_kept():
    """ray.init first makes SIGTERM exit the driver with status 15 from wherever it is (Ray's C++
    then dumps its stacks). A handler the caller installed (the CLI's: stop, clean up, one line)
    is put back afterwards, and a SIGTERM during ray.init itself (Ray's SystemExit(15)) goes to
    it, once what ray.init had started is shut down. Without one, Ray's handler stays."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    except SystemExit as e:
        if callable(before) and e.code == signal.SIGTERM:
            if ray.is_initialized():
                ray.shutdown()
            before(signal.SIGTERM, None)  # the caller's handler: it raises what the caller stops on
        raise
    finally:
        if callable(before):
            signal.signal(signal.SIGTERM, before)


def embedded_cpus(workers: int, cpus_per_worker: float, requested: int | None) -> int:
    """Logical CPUs for an embedded Ray: enough to place every worker (they may share cores)."""
    if requested is not None:
        return requested
    return max(os.cpu_count() or 1, math.ceil(workers * cpus_per_worker))


def check_resources(workers: int, cpus_per_worker: float, gpus_per_worker: float, total: dict | None = None) -> None:
    """Refuse, with the numbers, a job the cluster can never place (instead of waiting forever).
    `total`: the cluster's resources (default: the connected cluster's; an embedded Ray's are
    known before it starts)."""
    total = ray.cluster_resources() if total is None else total
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


def live_node_ids() -> list:
    """The live nodes' ids, the head's first, the others in a stable order."""
    head = head_node_id()
    others = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] != head)
    return ([head] if head is not None else []) + others
