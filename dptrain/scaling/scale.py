"""`dptrain scale`: throughput, speedup, efficiency and time-to-accuracy across worker counts.

    dptrain scale --workers 1,2,4 --out results/scale                       # the default study
    dptrain scale --workers 1,2 --steps 20 --repeats 1 --no-tta --out /tmp/s # a quick look
    dptrain scale --address auto --workers 1,2,4,8 ...                      # on a cluster

For every worker count it trains the model for a fixed number of steps, in strong
scaling (the global batch stays --batch-size) and weak scaling (each worker keeps
--batch-size / first count examples; the learning rate grows linearly with the
global batch, after a warm-up, as in Goyal et al. 2017), --repeats times, and
records steps/s, samples/s, speedup and efficiency against the smallest count, and
the step's breakdown: worker compute, server apply, and the rest (communication and
waiting). A time-to-accuracy phase trains MNIST-1D to --target-accuracy per worker
count. In the same run it measures the floors the trainer is held against (the
single-process loop; two Ray actor round trips) and fits the cost model
(dptrain/scaling/costmodel.py). It writes runs.jsonl, runs.csv, report.md and PNG plots.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
from pathlib import Path

from .. import compress
from ..config import ConfigError, TrainConfig, choices, parse_model
from ..data import load_dataset
from . import costmodel
from .measure import (WARMUP_STEPS, aggregate, aggregate_variants, compression_costs, variant_sweep,
                      compute_ceiling, measure_cost_inputs, measure_floors, median_ceilings, paired_strong, shard_update_s,
                      speedup_table, sweep, time_to_accuracy)
from .report import compression_section, cost_model_section, plots, report, servers_section, write_csv

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- command

def add_parser(sub) -> None:
    p = sub.add_parser("scale", help="scaling experiment: throughput, speedup, efficiency across worker counts",
                       description=__doc__.split("\n\n")[2] if __doc__ else None)
    p.add_argument("--workers", default="1,2,4", metavar="LIST", help="worker counts (default: 1,2,4)")
    p.add_argument("--mode", choices=["strong", "weak", "both"], default="both", help="scaling mode (default: both)")
    p.add_argument("--dataset", default="synthetic", metavar="NAME", help="dataset for the timing runs (default: synthetic)")
    p.add_argument("--model", default="784,1024,1024,10", metavar="SIZES", help="layer sizes (default: 784,1024,1024,10)")
    p.add_argument("--batch-size", type=int, default=256, metavar="N",
                   help="global batch of strong scaling; weak scaling keeps batch/first-count per worker (default: 256)")
    p.add_argument("--steps", type=int, default=40, metavar="N", help=f"steps per run, {WARMUP_STEPS} of them warm-up (default: 40)")
    p.add_argument("--repeats", type=int, default=3, metavar="N", help="runs per point (default: 3)")
    p.add_argument("--lr", type=float, default=0.01, metavar="X", help="learning rate at the first count (default: 0.01)")
    p.add_argument("--dtype", choices=choices("dtype"), default="float32")
    p.add_argument("--target-accuracy", type=float, default=0.6, metavar="X",
                   help="MNIST-1D test accuracy for the time-to-accuracy phase (default: 0.6)")
    p.add_argument("--max-epochs", type=int, default=60, metavar="N", help="epoch limit of that phase (default: 60)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True, help="run the time-to-accuracy phase")
    p.add_argument("--floors", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the overhead floors and fit the cost model")
    p.add_argument("--compress", default="none", metavar="LIST",
                   help="gradient compression settings to compare (none, fp16, bf16, topk:RATIO; e.g. "
                        "none,fp16,topk:0.01): bytes per step, step time, time to accuracy, the cost model")
    p.add_argument("--servers", default="1", metavar="LIST",
                   help="parameter-server counts K to compare (e.g. 1,2,4; every run of that sweep over the object "
                        "store): step time, bytes per worker and per server, time to accuracy, the cost model")
    p.add_argument("--network-gbit", type=float, default=10.0, metavar="X",
                   help="server link bandwidth assumed by the cluster predictions (default: 10 Gbit/s)")
    add_run_flags(p, "scale")


def add_run_flags(p, command: str) -> None:
    """The flags every experiment command shares: where it runs, the seed, the output folder."""
    p.add_argument("--address", default=None, metavar="auto|HOST:PORT", help="a Ray cluster; none: embedded local Ray")
    p.add_argument("--cpus", type=int, default=None, metavar="N", help="logical CPUs of the embedded Ray")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="X")
    p.add_argument("--transport", choices=choices("transport"), default="auto")
    p.add_argument("--seed", type=int, default=0, metavar="N")
    p.add_argument("--out", default=None, metavar="DIR", help=f"output folder (default: runs/{command}-<time>)")
    p.add_argument("--quiet", action="store_true")


def _counts(text: str, flag: str = "--workers") -> list:
    """[1, 2, 4] from "4,1,2": whole numbers >= 1, sorted, each once."""
    try:
        counts = sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        raise ConfigError(f"invalid {flag}: {text!r} (expected a list like 1,2,4)") from None
    if not counts or counts[0] < 1:
        raise ConfigError(f"invalid {flag}: {text!r} (counts must be >= 1)")
    return counts


def _compressions(text: str) -> list:
    """["none", ...] from "none,fp16,topk:0.01"; "none" first (the baseline) whenever others are given."""
    settings = [c.strip() for c in text.split(",") if c.strip()]
    for c in settings:
        try:
            compress.parse(c)
        except ValueError as e:
            raise ConfigError(f"invalid --compress: {e}") from None
    if not settings:
        raise ConfigError(f"invalid --compress: {text!r} (name at least one setting, e.g. none,fp16)")
    return ["none"] + [c for c in dict.fromkeys(settings) if c != "none"]


def _server_counts(text: str) -> list:
    """[1, ...] from "1,2,4": K = 1 first (the baseline) whenever others are given."""
    return [1] + [k for k in _counts(text, "--servers") if k != 1]


def run(args) -> int:
    counts = _counts(args.workers)
    compressions = _compressions(args.compress)
    server_counts = _server_counts(args.servers)
    if args.steps <= WARMUP_STEPS:
        raise ConfigError(f"invalid --steps: {args.steps} (must exceed the {WARMUP_STEPS} warm-up steps)", field="steps")
    if args.repeats < 1:
        raise ConfigError(f"invalid --repeats: {args.repeats} (must be >= 1)", field="repeats")
    modes = ["strong", "weak"] if args.mode == "both" else [args.mode]
    base = TrainConfig(dataset=args.dataset, model=parse_model(args.model), workers=counts[0],
                       batch_size=args.batch_size, steps=args.steps, lr=args.lr, dtype=args.dtype, seed=args.seed,
                       address=args.address, cpus=args.cpus, cpus_per_worker=args.cpus_per_worker,
                       transport=args.transport, log_every=10**6, momentum=0.9)
    for n in counts:  # every point must be a valid run before any starts
        for k in server_counts:
            base.replace(workers=n, servers=k, transport="object_store" if k > 1 else base.transport)
    dataset = load_dataset(args.dataset)
    from ..blocks import prepare
    prepare(base, dataset)  # a model that does not fit the data is refused before anything runs

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / f"scale-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    command = "dptrain scale " + " ".join(args.argv) if getattr(args, "argv", None) else "dptrain scale"

    from ..distributed.cluster import connect, embedded_cpus
    import ray
    started = connect(args.address, num_cpus=embedded_cpus(max(counts), args.cpus_per_worker, args.cpus))
    logging.getLogger("dptrain.metrics").setLevel(logging.WARNING)  # a sweep logs per run, not per step
    logging.getLogger("dptrain.distributed.trainer").setLevel(logging.WARNING)
    compressing, sharding = len(compressions) > 1, len(server_counts) > 1
    total = (len(modes) * len(counts) * args.repeats + (len(counts) if args.tta else 0) + (1 if args.floors else 0)
             + (len(compressions) * (len(counts) * args.repeats + (1 if args.tta else 0)) if compressing else 0)
             + (len(server_counts) * (len(counts) * args.repeats + (1 if args.tta else 0)) if sharding else 0))
    from tqdm import tqdm
    bar = tqdm(total=total, unit="run", disable=args.quiet, dynamic_ncols=True)

    def progress(msg):
        bar.update(1)
        bar.set_postfix_str(msg, refresh=True)
    try:
        runs, ceilings = sweep(base, dataset, counts, modes, args.repeats, progress,
                               ceiling=args.floors and "strong" in modes)
        with open(out / "runs.jsonl", "w") as f:
            for r in runs:
                f.write(json.dumps(r) + "\n")
        table = {mode: speedup_table(aggregate(runs), mode) for mode in modes}
        write_csv(out / "runs.csv", [r for rows in table.values() for r in rows])
        floors = model = inp = cluster_inp = None
        if args.floors:
            floors = measure_floors(base, dataset, args.steps, repeats=max(args.repeats, 3))
            if not ceilings:  # weak scaling only: one ceiling measurement
                ceilings = [dict(r, repeat=0) for r in compute_ceiling(base, dataset, counts, args.steps)]
            floors["ceiling"] = median_ceilings(ceilings)
            floors["paired_strong"] = paired_strong(runs, ceilings)
            progress("floors")
            strong = {r["workers"]: r for r in table.get("strong", [])}
            if 1 in strong:
                shared = any(r.get("shared_memory_workers") for r in runs if r["mode"] == "strong")
                inp, cluster_inp = measure_cost_inputs(base, strong[1], floors["actor_round_trip_ms"], shared)
                # the compute ceiling measured in the same rounds is this machine's P(N)
                inp = costmodel.CostInputs(**{**inp.to_dict(), "parallel_speedup": {
                    c["workers"]: c["ceiling_speedup"] for c in floors["ceiling"]}})
                measured = {n: strong[n]["step_ms"] / 1e3 for n in strong if n <= 4}
                model = cost_model_section(inp, cluster_inp, measured, base.batch_size, args.network_gbit)
            (out / "floors.json").write_text(json.dumps(floors, indent=2) + "\n")
        tta, curves = [], {}
        if args.tta:
            tta, curves = time_to_accuracy(base, counts, args.target_accuracy, args.max_epochs, progress)
            write_csv(out / "time_to_accuracy.csv", tta)
        def variants(cfg, field, values):
            """The sweep of `field` over `values` (medians per value and count) and, with the
            time-to-accuracy phase, each value's time at the largest count."""
            rows = aggregate_variants(variant_sweep(cfg, dataset, counts, field, values, args.repeats, progress),
                                      field, values)
            tta_rows = []
            for value in values if args.tta else []:
                found, _ = time_to_accuracy(cfg.replace(**{field: value}), [counts[-1]], args.target_accuracy,
                                            args.max_epochs, progress)
                tta_rows += [dict(r, **{field: value}) for r in found]
            return rows, tta_rows

        def write_section(name, section):
            write_csv(out / f"{name}.csv", section["rows"])
            (out / f"{name}.json").write_text(json.dumps({k: v for k, v in section.items() if k != "markdown"},
                                                         indent=2, default=str) + "\n")
        compression = None
        if compressing:
            crows, ctta = variants(base, "compress", compressions)
            compression = compression_section(
                crows, ctta, inp, costmodel.on_cluster(cluster_inp, args.network_gbit) if cluster_inp else None,
                compression_costs(base, compressions), base.batch_size, base.transport, args.network_gbit)
            write_section("compression", compression)
        servers = None
        if sharding:
            over_objects = base.replace(transport="object_store")  # K = 1 as well: like with like
            srows, stta = variants(over_objects, "servers", server_counts)
            here_objects = None
            one = next((r for r in srows if r["servers"] == 1 and r["workers"] == 1), None)
            if floors and one is not None:  # this machine over the object store, P(N) as measured
                here_objects, _ = measure_cost_inputs(over_objects, one, floors["actor_round_trip_ms"], False)
                here_objects = costmodel.CostInputs(**{
                    **here_objects.to_dict(), "shard_call_s": floors["actor_round_trip_ms"] / 1e3,
                    "parallel_speedup": {c["workers"]: c["ceiling_speedup"] for c in floors["ceiling"]}})
            cluster_servers = None
            if cluster_inp is not None:
                cluster_servers = costmodel.CostInputs(**{**costmodel.on_cluster(cluster_inp, args.network_gbit).to_dict(),
                                                          "shard_call_s": floors["actor_round_trip_ms"] / 1e3})
            apart = ({(k, n): shard_update_s(over_objects, n, k) for k in server_counts[1:] for n in counts}
                     if here_objects is not None else None)
            servers = servers_section(srows, stta, here_objects, cluster_servers, base.batch_size, args.network_gbit,
                                      apart)
            write_section("servers", servers)
        if model:
            (out / "costmodel.json").write_text(json.dumps({k: v for k, v in model.items() if k != "markdown"},
                                                           indent=2, default=str) + "\n")
        images = plots(out, table, curves)
        (out / "report.md").write_text(report(command, base, table, floors, tta, model, images, compression, servers))
    finally:
        bar.close()
        if started:
            ray.shutdown()
    for mode, rows in table.items():
        for r in rows:
            print(f"{mode:>6} N={r['workers']:<3} {r['step_ms']:8.1f} ms/step {r['samples_per_s']:10,.0f} samples/s "
                  f"speedup {r['speedup']:5.2f} efficiency {r['efficiency']:4.2f}")
    for r in (floors or {}).get("paired_strong", []):
        if r["ceiling"] is not None and r["workers"] > 1:
            print(f"strong N={r['workers']:<3} speedup {r['speedup']:.2f} within rounds, ceiling {r['ceiling']:.2f} "
                  f"(share {r['of_ceiling']:.2f})")
    if floors:
        print(f"1 worker vs single process: {floors['one_worker_step_ms']:.1f} vs {floors['local_step_ms']:.1f} ms "
              f"({100 * floors['one_worker_overhead']:+.1f}%); tiny model with 2 workers over {floors['tiny_transport']}: "
              f"{floors['tiny_two_worker_step_ms']:.2f} ms a step, Ray's actor round trip {floors['actor_round_trip_ms']:.2f} ms")
    for r in (compression or {}).get("rows", []):
        cut = f" ({r['bytes_cut']:.1f}x fewer)" if r.get("bytes_cut") and r["compress"] != "none" else ""
        print(f"{r['compress']:>10} N={r['workers']:<3} {r['step_ms']:8.1f} ms/step {r['sent_bytes_per_worker_step']:12,.0f} "
              f"bytes/worker/step{cut}")
    for r in (servers or {}).get("rows", []):
        model_ms = f" (model {r['predicted_ms']:.1f} ms)" if "predicted_ms" in r else ""
        print(f"servers {r['servers']:<3} N={r['workers']:<3} {r['step_ms']:8.1f} ms/step{model_ms} "
              f"{r['server_bytes_per_step']:12,.0f} bytes/server/step")
    print(f"results: {out}/ (report.md, runs.jsonl, runs.csv{', compression.csv' if compression else ''}"
          f"{', servers.csv' if servers else ''}"
          f"{', plots' if images else ''})")
    return 0
