"""A cost model of one synchronous parameter-server step, to reason beyond the machines we have.

For N workers, a global batch B, a model of G gradient bytes, K server shards:

    T(N) = t_fixed                                  actor-call latency per step
         + c * B / P(N)                             forward and backward on B / N examples
         + (2 * G / bw_object) * s                  a worker's copy of its gradient out, parameters in
                                                    (s = max(1, N / cores): workers beyond the
                                                    cores share them, one after another); G / bw
                                                    with the parameters read in place (below)
         + N * G / (K * bw_server)                  the server (shard) receives N gradients and
         + N * G / (K * bw_server)                  sends N parameter copies through its link
         + N * G / (K * bw_memory)                  and adds N gradients
         + t_opt * G / K                            optimizer update, per byte of its shard
         + t_shard (K > 1)                          the server's round trip to its shards

(the shards' adds and updates run at once on min(K, cores) cores: on one machine they share it;
one server's adds and update are U(T) times faster on T threads, U measured, where its workers
share its machine: T = 1 + N within the cores, as --update-threads auto takes them).

On one machine over shared memory the workers read the parameters where the server wrote
them and backward writes the gradient where the server reads it: what is left of the
transfer is one pass over the gradient (its finiteness check), G / bw.

With compressed gradients (`--compress`, a payload of r * G bytes for a gradient of G), the
gradient's part of every transfer shrinks by r, each worker pays t_encode per step (on its
cores, so times s), and the server decodes each payload into a dense buffer instead of
adding a dense gradient: N * t_decode + G / bw_memory (zeroing it) in place of N * G / bw_memory.

with t_fixed, c (seconds per example), bw_object (bytes/s of a worker's copy), bw_memory (bytes/s
of one pass over an array) and t_opt measured on this machine. For a cluster bw_object is Ray's
object store (a put and a get) and t_fixed two actor round trips; on one machine with shared
memory (dptrain scale's check) bw_object is a copy out of shared memory and t_fixed the
control channel's part of a step. bw_server is the server's network bandwidth; on one machine
there is no network (`bw_server=inf`).

P(N) is the compute speedup of N workers at once with no communication: N / s when nothing
else is known (N on a cluster, a core set per worker); on one machine, the measured compute
ceiling (N processes sharing its memory bandwidth and caches: 1.5-1.9 for 2 on the
development machine, not 2).

Speedup S(N) = T(1) / T(N) with the same global batch (strong scaling), efficiency S(N) / N.
The server saturates where its per-step traffic (1 + r) * N * G / (K * bw_server) equals the
compute time c * B / N: N* = sqrt(c * B * K * bw_server / ((1 + r) * G)).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class CostInputs:
    """Measured (or assumed) constants of the model; units in the field names."""

    compute_s_per_example: float
    grad_bytes: float
    object_bytes_per_s: float
    memory_bytes_per_s: float
    fixed_s: float
    optimizer_s_per_byte: float
    cores: int = 10**9  # workers that can compute at once (a cluster: one core set per worker)
    server_bytes_per_s: float = math.inf
    parallel_speedup: dict | None = None  # {N: P(N)} measured; None: P(N) = N (no contention)
    shard_call_s: float = 0.0  # with K > 1 shards: the server's round trip to them, per step
    parameters_in_place: bool = False  # workers read the server's parameters without a copy (shared memory)
    update_speedup: dict | None = None  # {T: U(T)} of one server's adds and update on T threads; None: 1 thread

    def to_dict(self) -> dict:
        return asdict(self)


def on_cluster(inp: CostInputs, network_gbit: float) -> CostInputs:
    """`inp` on a cluster: a core set per worker, and a server link of `network_gbit` Gbit/s."""
    return CostInputs(**{**inp.to_dict(), "cores": 10**9, "server_bytes_per_s": network_gbit * 1e9 / 8})


def step_time(inp: CostInputs, workers: int, batch: int, shards: int = 1, ratio: float = 1.0,
              encode_s: float = 0.0, decode_s: float | None = None, shard_s: float | None = None) -> dict:
    """Predicted seconds per step, split into compute, transfer, server and fixed parts. `ratio`:
    a compressed gradient's bytes over the dense gradient's; `encode_s` / `decode_s`: a worker's
    encoding and the server's decoding of one gradient (None: uncompressed, a dense add);
    `shard_s`: with K > 1 shards, their update measured apart (measure.shard_update_s), in place
    of the server's adds, update and round trip to them."""
    if workers < 1 or batch < 1 or shards < 1:
        raise ValueError(f"workers, batch and shards must be >= 1, got {workers}, {batch}, {shards}")
    g = inp.grad_bytes
    share = max(1.0, workers / inp.cores)
    if inp.parallel_speedup:  # measured: it includes any sharing of cores
        compute = inp.compute_s_per_example * batch / inp.parallel_speedup[workers]
    else:
        compute = inp.compute_s_per_example * batch / workers * share
    inbound = 0.0 if inp.parameters_in_place else 1.0  # the parameters' copy in
    transfer = ((inbound + ratio) * g / inp.object_bytes_per_s + encode_s) * share
    network = (1 + ratio) * workers * g / (shards * inp.server_bytes_per_s)
    adds = workers * g / inp.memory_bytes_per_s if decode_s is None else workers * decode_s + g / inp.memory_bytes_per_s
    server = (adds + inp.optimizer_s_per_byte * g) / min(shards, inp.cores)
    if shards == 1 and inp.update_speedup:
        server /= inp.update_speedup.get(min(1 + workers, max(inp.update_speedup)), 1.0)
    fixed = inp.fixed_s + (inp.shard_call_s if shards > 1 else 0.0)
    if shards > 1 and shard_s is not None:
        server, fixed = shard_s, inp.fixed_s
    total = fixed + compute + transfer + network + server
    return {"workers": workers, "shards": shards, "step_s": total, "compute_s": compute, "transfer_s": transfer,
            "network_s": network, "server_s": server, "fixed_s": fixed}


def scaling(inp: CostInputs, worker_counts, batch: int, shards: int = 1, **compression) -> list:
    """Strong scaling predictions: step time, speedup and efficiency against 1 worker (with
    `compression`: step_time's ratio, encode_s, decode_s)."""
    base = step_time(inp, 1, batch, shards, **compression)["step_s"]
    rows = []
    for n in worker_counts:
        row = step_time(inp, n, batch, shards, **compression)
        row["speedup"] = base / row["step_s"]
        row["efficiency"] = row["speedup"] / n
        row["samples_per_s"] = batch / row["step_s"]
        rows.append(row)
    return rows


def server_bound_workers(inp: CostInputs, batch: int, shards: int = 1, ratio: float = 1.0) -> float:
    """N* where the server's network time equals the compute time: beyond it, adding workers
    makes steps slower (infinite when the server has no network limit)."""
    if math.isinf(inp.server_bytes_per_s):
        return math.inf
    return math.sqrt(inp.compute_s_per_example * batch * shards * inp.server_bytes_per_s
                     / ((1 + ratio) * inp.grad_bytes))


def relative_errors(inp: CostInputs, measured: dict, batch: int, shards: int = 1) -> dict:
    """|predicted - measured| / measured step time for each measured worker count {N: seconds}."""
    return {n: abs(step_time(inp, n, batch, shards)["step_s"] - t) / t for n, t in measured.items()}
