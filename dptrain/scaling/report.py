"""The output of `dptrain scale`: CSV, markdown tables, the report and its plots."""

from __future__ import annotations

import csv
import datetime
import logging
import os
from pathlib import Path

from ..config import TrainConfig
from . import costmodel
from .measure import WARMUP_STEPS

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- output

def write_csv(path: Path, rows: list) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _fmt(v, digits=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def markdown_table(rows: list, columns: list) -> str:
    """columns: (header, key, digits)."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), d) for _, k, d in columns) + " |")
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot drawing to files, or None (with a warning) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("plots skipped: matplotlib is not installed (pip install 'dptrain[plots]')")
        return None
    return plt


def plots(out: Path, table: dict, curves: dict) -> list:
    """throughput.png, efficiency.png and loss_vs_time.png; [] when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return []
    made = []
    for name, key, ylabel in (("throughput.png", "samples_per_s", "samples / s"),
                              ("efficiency.png", "efficiency", "parallel efficiency")):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for mode, rows in table.items():
            if rows:
                ax.plot([r["workers"] for r in rows], [r[key] for r in rows], "o-", label=f"{mode} scaling")
        ax.set_xlabel("workers")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        counts = sorted({r["workers"] for rows in table.values() for r in rows})
        ax.set_xticks(counts, [str(n) for n in counts])  # 1, 2, 4 rather than 2^0, 2^1, 2^2
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        made.append(name)
    if curves:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for n, curve in sorted(curves.items()):
            ax.plot([c[0] for c in curve], [c[1] for c in curve], label=f"{n} worker(s)", lw=1)
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel("training loss (MNIST-1D)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "loss_vs_time.png", dpi=120)
        plt.close(fig)
        made.append("loss_vs_time.png")
    return made


def report(command: str, base: TrainConfig, table: dict, floors: dict | None, tta: list, model: dict | None,
           images: list, compression: dict | None = None, servers: dict | None = None) -> str:
    cols = [("workers", "workers", 0), ("global batch", "batch", 0), ("ms/step", "step_ms", 1),
            ("steps/s", "steps_per_s", 1), ("samples/s", "samples_per_s", 0), ("speedup", "speedup", 2),
            ("efficiency", "efficiency", 2), ("compute ms", "compute_ms", 1), ("apply ms", "apply_ms", 1),
            ("other ms", "other_ms", 1)]
    parts = [f"Measured by `{command}` on {datetime.date.today()} ({os.cpu_count()} CPUs), model "
             f"{'-'.join(map(str, base.model))}, {base.dtype}, dataset {base.dataset}. Medians over repeats of the "
             f"median step after {WARMUP_STEPS} warm-up steps; compute = the slowest worker's step, apply = the "
             "server's update, other = communication and waiting."]
    for mode, rows in table.items():
        if rows:
            parts.append(f"### {mode.capitalize()} scaling\n\n" + markdown_table(rows, cols))
    if floors:
        parts.append("### Against the floors\n\n" + markdown_table([
            {"what": f"1 worker vs the single-process loop ({floors['model']}, batch {floors['batch']})",
             "floor": f"{floors['local_step_ms']:.2f} ms", "trainer": f"{floors['one_worker_step_ms']:.2f} ms",
             "difference": f"{100 * floors['one_worker_overhead']:+.1f}% ({len(floors['blocks_ms'])} alternating "
                          f"blocks of {floors['block_steps']} steps)"},
            {"what": f"tiny model (2-8-2), 2 workers over {floors['tiny_transport']}, vs two "
                     "Ray actor round trips (shared memory makes no Ray call a step: it may be below them)",
             "floor": f"2 x {floors['actor_round_trip_ms']:.2f} ms",
             "trainer": f"{floors['tiny_two_worker_step_ms']:.2f} ms",
             "difference": f"{floors['tiny_added_ms']:+.2f} ms"},
            {"what": "for comparison: empty actors, 2 worker calls then a server call chained through the driver",
             "floor": f"2 x {floors['actor_round_trip_ms']:.2f} ms",
             "trainer": f"{floors['driver_chained_empty_step_ms']:.2f} ms", "difference": "(Ray alone)"}],
            [("", "what", 0), ("floor", "floor", 0), ("trainer", "trainer", 0), ("difference", "difference", 0)]))
        if floors.get("ceiling"):
            parts.append("### Compute ceiling (no communication)\n\nN processes at once, each running forward "
                         "and backward on B/N examples, against one process on B: the best strong-scaling "
                         "speedup this machine allows before any transfer or update. Measured in every round, "
                         "right after that round's strong-scaling runs; medians over rounds.\n\n"
                         + markdown_table(floors["ceiling"], [("workers", "workers", 0), ("examples each", "examples_each", 0),
                                                              ("slowest ms", "compute_ms", 1),
                                                              ("ceiling speedup", "ceiling_speedup", 2),
                                                              ("rounds", "rounds", 0)]))
        if floors.get("paired_strong"):
            rows = [dict(r, per_round=" / ".join(f"{a:.2f} of {b:.2f}" for a, b in zip(r["speedups"], r["ceilings"])))
                    for r in floors["paired_strong"]]
            parts.append("### Strong scaling against the ceiling, round by round\n\nThe trainer's speedup within "
                         "each round next to the ceiling measured in the same round (this machine's speed drifts "
                         "by 10-25% between minutes; a round's points are minutes apart at most).\n\n"
                         + markdown_table(rows, [("workers", "workers", 0), ("speedup", "speedup", 2),
                                                 ("ceiling", "ceiling", 2), ("share of ceiling", "of_ceiling", 2),
                                                 ("per round: speedup of ceiling", "per_round", 0)]))
    if tta:
        parts.append("### Time to accuracy (MNIST-1D, 40-256-256-10, batch 256, SGD 0.1 momentum 0.9)\n\n"
                     + markdown_table(tta, [("workers", "workers", 0), ("target", "target_accuracy", 2),
                                            ("seconds", "time_to_target_s", 1), ("steps", "steps", 0),
                                            ("final test accuracy", "final_test_accuracy", 3)]))
    if model:
        parts.append(model["markdown"])
    if compression:
        parts.append(compression["markdown"])
    if servers:
        parts.append(servers["markdown"])
    if images:
        parts.append("\n".join(f"![{i}]({i})" for i in images))
    return "\n\n".join(parts) + "\n"


def cost_model_section(inp: costmodel.CostInputs, cluster_inp: costmodel.CostInputs, measured: dict, batch: int,
                       network_gbit: float) -> dict:
    """The check of `inp` (this machine) against the measured steps, and predictions from
    `cluster_inp` with a server link of `network_gbit`."""
    errors = costmodel.relative_errors(inp, measured, batch)
    check = [{"workers": n, "measured_ms": 1e3 * t, "predicted_ms": 1e3 * costmodel.step_time(inp, n, batch)["step_s"],
              "error": errors[n]} for n, t in sorted(measured.items())]
    cluster = costmodel.on_cluster(cluster_inp, network_gbit)
    counts = [8, 16, 32, 64, 128, 256]
    predictions = {k: costmodel.scaling(cluster, [1] + counts, batch, shards=k) for k in (1, 4, 16)}
    pred_rows = []
    for n in counts:
        row = {"workers": n}
        for k, rows in predictions.items():
            r = next(x for x in rows if x["workers"] == n)
            row[f"ms_K{k}"] = 1e3 * r["step_s"]
            row[f"speedup_K{k}"] = r["speedup"]
            row[f"eff_K{k}"] = r["efficiency"]
        pred_rows.append(row)
    nstar = {k: costmodel.server_bound_workers(cluster, batch, k) for k in (1, 4, 16)}
    passes = "one pass per step: the parameters are read in place" if inp.parameters_in_place else "two passes per step"
    speedups = sorted((k, v) for k, v in (inp.update_speedup or {}).items() if k > 1)
    threads = (", the server's adds and update " + ", ".join(f"{v:.2f}x on {k} threads" for k, v in speedups)
               + " (--update-threads auto)") if speedups else ""
    md = ["### Cost model", "",
          "Inputs measured in this run: " + ", ".join([
              f"compute {1e6 * inp.compute_s_per_example:.1f} us/example",
              f"gradient {inp.grad_bytes / 2**20:.2f} MiB",
              f"memory pass {inp.memory_bytes_per_s / 1e9:.2f} GB/s",
              f"optimizer {1e9 * inp.optimizer_s_per_byte:.2f} ns/byte"]) + "; on this machine "
          + f"a worker's transport {inp.object_bytes_per_s / 1e9:.2f} GB/s ({passes}){threads}"
          + f" and a fixed {1e3 * inp.fixed_s:.2f} ms per step; on a cluster Ray's object store "
          + f"{cluster_inp.object_bytes_per_s / 1e9:.2f} GB/s (put+get) and a fixed {1e3 * cluster_inp.fixed_s:.2f} ms "
          "(two actor round trips).", "",
          "Check against the measured strong-scaling steps on this machine"
          + (" (compute speedup P(N) = the measured compute ceiling: "
             + ", ".join(f"{v:.2f} for {k}" for k, v in sorted(inp.parallel_speedup.items())) + ")"
             if inp.parallel_speedup else f" (compute shared by {inp.cores} cores)") + ":", "",
          markdown_table(check, [("workers", "workers", 0), ("measured ms", "measured_ms", 1),
                                 ("predicted ms", "predicted_ms", 1), ("error", "error", 2)]), "",
          f"Predictions for a cluster (a core set per worker, a {network_gbit:g} Gbit/s link at each server "
          f"shard), global batch {batch}, K server shards:", "",
          markdown_table(pred_rows, [("workers", "workers", 0)] + [
              (h.format(k=k), key.format(k=k), d) for k in (1, 4, 16)
              for h, key, d in (("ms K={k}", "ms_K{k}", 1), ("speedup K={k}", "speedup_K{k}", 2),
                                ("eff. K={k}", "eff_K{k}", 2))]), "",
          "The server's link saturates (its traffic per step equals the compute time) at N* = "
          + ", ".join(f"{v:.1f} workers for K={k}" for k, v in nstar.items())
          + ": beyond N*, one server makes every added worker slow the step down; K shards raise N* by sqrt(K)."]
    return {"markdown": "\n".join(md), "check": check, "predictions": pred_rows, "n_star": nstar,
            "inputs": inp.to_dict(), "cluster_inputs": cluster.to_dict()}


TTA_RUN = " (MNIST-1D, 40-256-256-10, batch 256, SGD 0.1 momentum 0.9):"


def tta_table(tta: list, field: str) -> str:
    """The time-to-accuracy rows of a sweep over `field` (compress, servers)."""
    return markdown_table(tta, [(field, field, 0), ("workers", "workers", 0), ("target", "target_accuracy", 2),
                                ("seconds", "time_to_target_s", 1), ("steps", "steps", 0),
                                ("final test accuracy", "final_test_accuracy", 3)])


def compression_section(rows: list, tta: list, inp: costmodel.CostInputs | None,
                        cluster: costmodel.CostInputs | None, costs: dict, batch: int, transport: str,
                        network_gbit: float) -> dict:
    """The compressed-gradient runs (`rows`: medians per setting and worker count), their time to
    accuracy, and the cost model's prediction of each measured step (`inp`: this machine's inputs
    measured in this run) and for a cluster (`cluster`, costmodel.on_cluster); `costs`: each
    setting's ratio, encode and decode times."""
    for r in rows:
        if inp is not None and (not inp.parallel_speedup or r["workers"] in inp.parallel_speedup):
            terms = costs.get(r["compress"], {})
            r["predicted_ms"] = 1e3 * costmodel.step_time(inp, r["workers"], batch, **terms)["step_s"]
            r["error"] = abs(r["predicted_ms"] - r["step_ms"]) / r["step_ms"]
    cols = [("compress", "compress", 0), ("workers", "workers", 0), ("ms/step", "step_ms", 2),
            ("bytes/worker/step", "sent_bytes_per_worker_step", 0), ("bytes/server/step", "server_bytes_per_step", 0),
            ("fewer bytes", "bytes_cut", 1)]
    if any("predicted_ms" in r for r in rows):
        cols += [("model ms", "predicted_ms", 2), ("model error", "error", 2)]
    md = ["### Compressed gradients", "",
          f"Strong scaling with each `--compress` setting ({transport} transport), measured in the same rounds; "
          "bytes are the payloads' measured lengths, and one server receives every worker's. "
          + ("The cost model's terms, measured here: " + "; ".join(
              f"{k}: ratio {v['ratio']:.4f}, encode {1e3 * v['encode_s']:.2f} ms, decode {1e3 * v['decode_s']:.2f} ms"
              for k, v in costs.items()) + "." if costs else ""), "",
          markdown_table(rows, cols)]
    if tta:
        md += ["", "Time to accuracy per setting" + TTA_RUN, "", tta_table(tta, "compress")]
    cluster_rows = []
    if cluster is not None:
        counts = [8, 32, 128]
        for setting in ["none", *costs]:
            terms = costs.get(setting, {})
            pred = costmodel.scaling(cluster, [1, *counts], batch, **terms)
            row = {"compress": setting, "n_star": costmodel.server_bound_workers(cluster, batch,
                                                                                ratio=terms.get("ratio", 1.0))}
            for p in pred[1:]:
                row[f"ms_{p['workers']}"], row[f"speedup_{p['workers']}"] = 1e3 * p["step_s"], p["speedup"]
            cluster_rows.append(row)
        md += ["", f"The cost model for a cluster (one server, a {network_gbit:g} Gbit/s link, a core set per "
               "worker, this machine's compute and encode/decode times): compressing the gradients leaves the "
               "parameters' broadcast dense, so the server's traffic shrinks by at most half and N* grows by "
               "at most sqrt(2):", "",
               markdown_table(cluster_rows, [("compress", "compress", 0), ("N*", "n_star", 1)] + [
                   (h.format(n=n), k.format(n=n), d) for n in counts
                   for h, k, d in (("ms N={n}", "ms_{n}", 1), ("speedup N={n}", "speedup_{n}", 2))])]
    return {"markdown": "\n".join(md), "rows": rows, "time_to_accuracy": tta, "costs": costs,
            "cluster": cluster_rows}


def servers_section(rows: list, tta: list, inp: costmodel.CostInputs | None, cluster: costmodel.CostInputs | None,
                    batch: int, network_gbit: float, shard_s: dict | None = None) -> dict:
    """The sharded-server runs (`rows`: medians per server count K and worker count, all over the
    object store), their time to accuracy, the cost model's prediction of each measured step
    (`inp`: this machine's object-store inputs measured in this run; `shard_s`: (K, N) -> the
    shards' update measured apart, measure.shard_update_s) and for a cluster."""
    shard_s = shard_s or {}
    for r in rows:
        if inp is not None and (not inp.parallel_speedup or r["workers"] in inp.parallel_speedup):
            measured_apart = shard_s.get((r["servers"], r["workers"]))
            r["predicted_ms"] = 1e3 * costmodel.step_time(inp, r["workers"], batch, r["servers"],
                                                          shard_s=measured_apart)["step_s"]
            r["error"] = abs(r["predicted_ms"] - r["step_ms"]) / r["step_ms"]
            if measured_apart is not None:
                r["shard_update_ms"] = 1e3 * measured_apart
    cols = [("servers", "servers", 0), ("workers", "workers", 0), ("ms/step", "step_ms", 2),
            ("server ms/step", "apply_ms", 2), ("bytes/worker/step", "sent_bytes_per_worker_step", 0),
            ("bytes/server/step", "server_bytes_per_step", 0), ("fewer per server", "server_bytes_cut", 1)]
    if any("predicted_ms" in r for r in rows):
        cols += [("shards' update apart ms", "shard_update_ms", 2), ("model ms", "predicted_ms", 2),
                 ("model error", "error", 2)]
    md = ["### Sharded parameter servers", "",
          "Strong scaling with K server shards (`--servers`), every run over the object store (K = 1 too, "
          "so that the rows compare like with like), measured in the same rounds. A worker sends its whole "
          "gradient in K slices; the busiest server receives the workers' slices of its range (its 1/K). "
          "\"server ms\" is the update as the server sees it: with K > 1, the round trip to its shards. The cost "
          "model's server term for K > 1 is the shards' update measured apart (K shards, each given N slices "
          "of its range through the object store, returning its new range; no workers running), which "
          "includes Ray's work on the megabyte arguments and results.",
          "", markdown_table(rows, cols)]
    if tta:
        md += ["", "Time to accuracy per K" + TTA_RUN, "", tta_table(tta, "servers")]
    cluster_rows = []
    if cluster is not None:
        counts = [4, 8, 16, 32, 64]
        for k in sorted({r["servers"] for r in rows} | {8}):
            pred = costmodel.scaling(cluster, [1, *counts], batch, shards=k)
            row = {"servers": k, "n_star": costmodel.server_bound_workers(cluster, batch, k)}
            for p in pred[1:]:
                row[f"ms_{p['workers']}"], row[f"speedup_{p['workers']}"] = 1e3 * p["step_s"], p["speedup"]
            cluster_rows.append(row)
        md += ["", f"The cost model for a cluster (a {network_gbit:g} Gbit/s link at each server shard, a core set "
               "per worker, this machine's compute, an extra actor round trip per step for K > 1): each shard "
               "carries 1/K of the traffic, so N* grows by sqrt(K):", "",
               markdown_table(cluster_rows, [("servers", "servers", 0), ("N*", "n_star", 1)] + [
                   (h.format(n=n), k.format(n=n), d) for n in counts
                   for h, k, d in (("ms N={n}", "ms_{n}", 1), ("speedup N={n}", "speedup_{n}", 2))])]
    return {"markdown": "\n".join(md), "rows": rows, "time_to_accuracy": tta, "cluster": cluster_rows}
