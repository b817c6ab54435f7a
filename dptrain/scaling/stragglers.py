"""`dptrain stragglers`: what a slow worker costs each kind of step, to a target accuracy.

    dptrain stragglers --modes sync,ssp:2,backup:1 --straggler 3:3 --workers 4 --out docs/stragglers

For every mode (sync: the exact synchronous step; ssp:TAU: bounded staleness TAU;
backup:B: B backup workers beside the N) it trains MNIST-1D to --target-accuracy,
with no straggler and with the --straggler given, --repeats times, and records
the wall time to the target (measured from the first step, as the summary's
time_to_target_s), the steps it took and the final test accuracy. It writes
runs.jsonl, report.md (the table and, per mode, the slowdown the straggler caused),
accuracy_vs_time.png (test accuracy at each epoch end against wall time, one line
per mode and straggler setting) and timeline.png (a window of steps of one
straggled run per mode: who computed when, and when the server applied).
"""

from __future__ import annotations

import datetime
import json
import logging
import statistics
import time
from pathlib import Path

from ..config import ConfigError, TrainConfig, parse_model, parse_straggler
from ..data import load_dataset
from .report import pyplot
from .scale import add_run_flags

log = logging.getLogger(__name__)


def add_parser(sub) -> None:
    p = sub.add_parser("stragglers", help="straggler experiment: sync, bounded staleness and backup workers "
                                          "to a target accuracy",
                       description=__doc__.split("\n\n")[2] if __doc__ else None)
    p.add_argument("--modes", default="sync,ssp:2,backup:1", metavar="LIST",
                   help="steps to compare: sync, ssp:TAU (TAU a whole number or inf), backup:B (default: "
                        "sync,ssp:2,backup:1)")
    p.add_argument("--straggler", default="3:3", metavar="RANK:FACTOR",
                   help="the slow worker of the straggled runs, as train's --straggler (default: 3:3)")
    p.add_argument("--workers", type=int, default=4, metavar="N", help="workers whose gradients count (default: 4)")
    p.add_argument("--model", default="40,256,256,10", metavar="SIZES", help="layer sizes (default: 40,256,256,10)")
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="global batch (default: 256)")
    p.add_argument("--lr", type=float, default=0.1, metavar="X", help="SGD learning rate (default: 0.1)")
    p.add_argument("--momentum", type=float, default=0.9, metavar="X", help="SGD momentum (default: 0.9)")
    p.add_argument("--target-accuracy", type=float, default=0.6, metavar="X",
                   help="MNIST-1D test accuracy to reach (default: 0.6)")
    p.add_argument("--max-epochs", type=int, default=60, metavar="N", help="epoch limit of a run (default: 60)")
    p.add_argument("--repeats", type=int, default=3, metavar="N", help="runs per point (default: 3)")
    add_run_flags(p, "stragglers")


def parse_modes(text: str) -> list:
    """"sync,ssp:2,backup:1" -> [("sync", {}), ("ssp:2", {"staleness": 2.0}), ("backup:1", {"backup_workers": 1})]."""
    modes = []
    for item in [m.strip() for m in text.split(",") if m.strip()]:
        kind, _, value = item.partition(":")
        try:
            if kind == "sync" and not value:
                modes.append((item, {}))
                continue
            if kind == "ssp" and value:
                tau = float(value)
                if tau == float("inf") or (tau.is_integer() and tau >= 1):
                    modes.append((item, {"staleness": tau}))
                    continue
            if kind == "backup" and value.isdigit() and int(value) >= 1:
                modes.append((item, {"backup_workers": int(value)}))
                continue
        except ValueError:
            pass
        raise ConfigError(f"invalid --modes: {item!r} (expected sync, ssp:TAU with TAU >= 1 or inf, or backup:B "
                          "with B >= 1, comma-separated)", field="modes")
    if not modes:
        raise ConfigError(f"invalid --modes: {text!r} (name at least one)", field="modes")
    return modes


def run(args) -> int:
    modes = parse_modes(args.modes)
    if args.repeats < 1:
        raise ConfigError(f"invalid --repeats: {args.repeats} (must be >= 1)", field="repeats")
    parse_straggler(args.straggler)
    base = TrainConfig(dataset="mnist1d", model=parse_model(args.model), workers=args.workers,
                       batch_size=args.batch_size, epochs=args.max_epochs, lr=args.lr, momentum=args.momentum,
                       target_accuracy=args.target_accuracy, seed=args.seed, address=args.address, cpus=args.cpus,
                       cpus_per_worker=args.cpus_per_worker, transport=args.transport, log_every=10**6)
    configs = [(name, straggled, base.replace(**settings, straggler=args.straggler if straggled else None))
               for name, settings in modes for straggled in (False, True)]  # every run valid before any starts
    dataset = load_dataset("mnist1d")
    from ..blocks import prepare
    prepare(base, dataset)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / f"stragglers-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    command = "dptrain stragglers " + " ".join(args.argv) if getattr(args, "argv", None) else "dptrain stragglers"

    import ray
    from tqdm import tqdm

    from ..distributed.cluster import connect, embedded_cpus
    started = connect(args.address, num_cpus=embedded_cpus(max(c.replicas for _, _, c in configs),
                                                            args.cpus_per_worker, args.cpus))
    for name in ("dptrain.metrics", "dptrain.distributed.trainer"):  # a sweep logs per run, not per step
        logging.getLogger(name).setLevel(logging.WARNING)
    bar = tqdm(total=len(configs) * args.repeats, unit="run", disable=args.quiet, dynamic_ncols=True)
    runs = []
    try:
        for repeat in range(args.repeats):  # rounds: each point sees the machine's noise alike
            for name, straggled, cfg in configs:
                runs.append(dict(_timed_run(cfg, dataset), mode=name, straggler=args.straggler if straggled else None,
                                 repeat=repeat))
                bar.update(1)
                bar.set_postfix_str(f"{name}{' straggled' if straggled else ''}", refresh=True)
    finally:
        bar.close()
        if started:
            ray.shutdown()
    with open(out / "runs.jsonl", "w") as f:
        for r in runs:
            f.write(json.dumps({k: v for k, v in r.items() if k != "timeline"}) + "\n")
    table = summarize(runs, [name for name, _ in modes])
    images = plots(out, runs, [name for name, _ in modes])
    (out / "report.md").write_text(report(command, base, args.straggler, table, images))
    for row in table:
        print(f"{row['mode']:>10} {'straggler ' + row['straggler'] if row['straggler'] else 'no straggler':>16}: "
              f"{_fmt(row['time_to_target_s'])} s to {args.target_accuracy:.0%} ({row['reached']}/{row['runs']} "
              f"reached), final {_fmt(row['final_test_accuracy'], 3)}, x{_fmt(row.get('slowdown'))} of no straggler, "
              f"x{_fmt(row.get('vs_sync'))} of sync with none")
    print(f"results: {out}/ (report.md, runs.jsonl{', plots' if images else ''})")
    return 0


def _timed_run(cfg: TrainConfig, dataset) -> dict:
    """One run to the target: its summary's figures, each epoch end's (wall time, test accuracy)
    as the driver received it, and its step records' timelines."""
    from ..distributed import Trainer
    curve, steps, t0 = [], [], [None]

    def sink(record):
        now = time.perf_counter()
        if record.get("kind") == "step":
            if t0[0] is None:  # the first step's record: its own time before it
                t0[0] = now - record["time_s"]
            steps.append(record)
        elif record.get("kind") == "epoch" and "test_accuracy" in record:
            curve.append([now - t0[0], record["test_accuracy"]])

    s = Trainer(cfg, dataset, sink=sink).fit().summary
    return {"time_to_target_s": s.get("time_to_target_s"),
            "steps": s["target_step"] + 1 if s.get("target_step") is not None else s["steps"],
            "final_test_accuracy": s.get("test_accuracy"), "wall_s": s["wall_s"], "curve": curve,
            "staleness_histogram": s.get("staleness_histogram"), "dropped_by_rank": s.get("dropped_by_rank"),
            "timeline": [{k: r[k] for k in ("step", "timeline", "versions", "counted", "dropped") if k in r}
                         for r in steps]}


def summarize(runs: list, modes: list) -> list:
    """Per mode and straggler setting: medians over the repeats, and the slowdowns: against the same
    mode without a straggler, and against sync without one."""
    rows = []
    for mode in modes:
        for straggled in (False, True):
            mine = [r for r in runs if r["mode"] == mode and bool(r["straggler"]) == straggled]
            times = [r["time_to_target_s"] for r in mine if r["time_to_target_s"] is not None]
            rows.append({"mode": mode, "straggler": mine[0]["straggler"], "runs": len(mine), "reached": len(times),
                         "time_to_target_s": statistics.median(times) if times else None,
                         "steps": statistics.median(r["steps"] for r in mine),
                         "final_test_accuracy": statistics.median(r["final_test_accuracy"] for r in mine)})
    by = {(r["mode"], bool(r["straggler"])): r for r in rows}
    sync = by.get(("sync", False), {}).get("time_to_target_s")
    for row in rows:
        calm = by[(row["mode"], False)]["time_to_target_s"]
        t = row["time_to_target_s"]
        row["slowdown"] = t / calm if t and calm else None
        row["vs_sync"] = t / sync if t and sync else None
    return rows


def _fmt(v, digits=2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def report(command: str, base: TrainConfig, straggler: str, table: list, images: list) -> str:
    lines = [f"# Stragglers: sync, bounded staleness and backup workers ({datetime.date.today()})", "",
             f"Command: `{command}`", "",
             f"MNIST-1D, model {','.join(map(str, base.model))}, global batch {base.batch_size}, SGD lr {base.lr} "
             f"momentum {base.momentum}, {base.workers} workers (+ B backups in backup:B), target test accuracy "
             f"{base.target_accuracy:.0%} (checked at every epoch end), at most {base.epochs} epochs. The straggled "
             f"runs: `--straggler {straggler}`. Medians over the repeats; time from the first step.", "",
             "| mode | straggler | time to target (s) | reached | steps | final test acc | x same mode, no straggler "
             "| x sync, no straggler |", "|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['mode']} | {r['straggler'] or 'none'} | {_fmt(r['time_to_target_s'])} | "
                     f"{r['reached']}/{r['runs']} | {_fmt(r['steps'], 0)} | {_fmt(r['final_test_accuracy'], 3)} | "
                     f"{_fmt(r['slowdown'])} | {_fmt(r['vs_sync'])} |")
    lines.append("")
    lines += [f"![{name}]({name})" for name in images]
    return "\n".join(lines) + "\n"


def plots(out: Path, runs: list, modes: list) -> list:
    """accuracy_vs_time.png and timeline.png; [] when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, mode in enumerate(modes):
        for straggled, style in ((False, "-"), (True, "--")):
            run = next((r for r in runs if r["mode"] == mode and bool(r["straggler"]) == straggled), None)
            if run and run["curve"]:
                t, acc = zip(*run["curve"])
                ax.plot(t, acc, style, color=f"C{i}", marker=".",
                        label=f"{mode}{', straggler ' + run['straggler'] if straggled else ''}")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("MNIST-1D test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_time.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(len(modes), 1, figsize=(9, 2.2 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        run = next((r for r in runs if r["mode"] == mode and r["straggler"]), None)
        if not run or len(run["timeline"]) < 3:
            continue
        window = run["timeline"][len(run["timeline"]) // 2:][:8]
        origin = min(c[1] for rec in window for c in rec["timeline"]["compute"])
        ranks = sorted({c[0] for rec in window for c in rec["timeline"]["compute"]})
        for rec in window:
            for rank, start, end in rec["timeline"]["compute"]:
                ax.barh(rank, 1e3 * (end - start), left=1e3 * (start - origin), color=f"C{rec['step'] % 10}",
                        edgecolor="black", linewidth=0.3)
            a0, a1 = rec["timeline"]["apply"]
            ax.barh(-1, max(1e3 * (a1 - a0), 0.2), left=1e3 * (a0 - origin), color=f"C{rec['step'] % 10}",
                    edgecolor="black", linewidth=0.3)
        ax.set_yticks([-1] + ranks, ["server"] + [f"worker {r}" for r in ranks])
        ax.set_title(f"{mode}, straggler {run['straggler']}: steps {window[0]['step']}-{window[-1]['step']} "
                     "(colour = step; bars of the gradients each update used)", fontsize=8)
    axes[-1, 0].set_xlabel("ms")
    fig.tight_layout()
    fig.savefig(out / "timeline.png", dpi=110)
    plt.close(fig)
    return ["accuracy_vs_time.png", "timeline.png"]
