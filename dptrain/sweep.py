"""Ray Tune sweeps whose trials are dptrain fleets: `dp.tune(cfg, space)` and `dptrain tune`.

(The module is `sweep`: `dptrain.tune` is the function.)

    result = dp.tune(dp.TrainConfig(dataset="mnist1d", epochs=8),
                     {"lr": "loguniform:1e-3:3e-1", "workers": "choice:1,2"},
                     samples=6, scheduler="asha", metric="test_accuracy", mode="max")
    result.best["config"], result.best["run"]        # the best trial's settings and run folder

Each trial is one `dptrain.Trainer` run of the base config with the trial's sampled settings,
its driver inside the trial's actor. A trial reserves, through Tune, a placement group of one
bundle for its driver and server and one per worker (`trial_resources`), and dptrain places
its actors in those bundles (fleet.Fleet: the trial's group replaces --spread's own group
and the server's pinning to the head node). Every held-out evaluation (each epoch's end,
and --eval-every's) is one `ray.tune.report`, so Tune's schedulers work: ASHA stops a poor
trial at an evaluation, and the trial's run ends there; what it started dies with its
actor, and the sweep removes the shared memory a stopped trial's fleet could not
(`release_shared_memory`, on every node).

A trial's run folder is `<trial dir>/run`, a dptrain run folder: the trial's settings, its
metrics and final parameters, and its checkpoints with --checkpoint-every, from which a
trial restored by Tune (`dptrain tune --restore DIR` after the sweep's driver died) resumes.
The step contract holds inside a trial as anywhere: its parameters are those of
`dptrain train` with the same settings, bit for bit.

A search space is a dict of TrainConfig field -> a Tune domain, or a text spec:
`uniform:LOW:HIGH`, `loguniform:LOW:HIGH`, `randint:LOW:HIGH` (HIGH excluded, as Ray's),
`choice:A,B,...` (sampled), `grid:A,B,...` (every value, times --samples); values that hold
commas themselves (models by widths) are separated by semicolons: `choice:2,16,2;2,64,2`.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import logging
import math
import re
import shutil
from pathlib import Path

from .callbacks import Callback
from .config import ConfigError, TrainConfig

log = logging.getLogger(__name__)

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
METRICS = ("test_loss", "test_accuracy")  # what every report carries (test_accuracy when classifying)
TUNE_FIELDS_REFUSED = ("out", "address", "progress", "cpus")  # the sweep's own, not a trial's
DATA_FIELDS = {"dataset", "data", "label", "features", "seq_len", "token_dtype", "vocab_size", "seed"}  # what the data is (seed: user data's split)


def is_spec(text) -> bool:
    """Whether `text` reads as a search-space spec ("loguniform:1e-4:1e-1", "choice:1,2")."""
    return isinstance(text, str) and text.split(":", 1)[0] in DISTRIBUTIONS and ":" in text


@dataclasses.dataclass(frozen=True)
class Domain:
    """A parsed search-space spec of one setting."""

    field: str
    kind: str
    values: tuple  # (low, high) or the choices, typed as the setting is

    def to_tune(self):
        from ray import tune
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "randint":
            return tune.randint(*self.values)
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return tune.grid_search(list(self.values))

    def extremes(self) -> tuple:
        """Values to check the setting with: both ends of a range, or every choice."""
        return (self.values[0], self.values[1] - 1) if self.kind == "randint" else self.values


def _field_types() -> dict:
    return {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}


def _typed(field: str, text: str):
    kind = _field_types()[field]
    if field == "model":
        from .config import is_widths, parse_model
        return tuple(parse_model(text)) if is_widths(text) else text
    if "bool" in kind:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{text!r} is not true or false")
    if "int" in kind and "float" not in kind:
        return int(text)
    if "float" in kind:
        return float(text)
    return text


def parse_space(space: dict, base: TrainConfig) -> dict:
    """{field: Domain} of a space given as text specs (or Tune domains, kept as they are); a
    ConfigError naming the setting for a malformed spec, an unknown distribution or setting,
    or a value the setting refuses (every choice and both ends of a range are checked)."""
    fields = _field_types()
    out = {}
    for name, spec in space.items():
        field = name.replace("-", "_")
        flag = "--" + field.replace("_", "-")
        if field not in fields:
            raise ConfigError(f"invalid search space: {flag} is not a setting of dptrain train")
        if field in TUNE_FIELDS_REFUSED:
            raise ConfigError(f"invalid {flag}: {spec!r} (the sweep's own setting: it cannot be searched)",
                              field=field)
        if not isinstance(spec, str):  # a Tune domain given by a library caller
            out[field] = spec
            continue
        kind, _, rest = spec.partition(":")
        if kind not in DISTRIBUTIONS or not _:
            raise ConfigError(f"invalid {flag}: {spec!r} (unknown distribution {kind!r}: give uniform, loguniform, "
                              "randint, choice or grid, as in loguniform:1e-4:1e-1 or choice:1,2,4)", field=field)
        try:
            if kind in ("choice", "grid"):
                items = [v.strip() for v in rest.split(";" if ";" in rest else ",")]  # ; between models
                if not rest.strip() or not all(items):
                    raise ValueError(f"{kind}: needs values, comma-separated (choice:1,2,4)")
                values = tuple(_typed(field, v) for v in items)
            else:
                parts = rest.split(":")
                if len(parts) != 2 or not all(p.strip() for p in parts):
                    raise ValueError(f"{kind}:LOW:HIGH, two numbers")
                cast = int if kind == "randint" else float
                low, high = cast(parts[0]), cast(parts[1])
                if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
                    raise ValueError(f"LOW < HIGH, and both finite (got {low:g} and {high:g})")
                if kind == "loguniform" and low <= 0:
                    raise ValueError(f"loguniform needs LOW > 0 (got {low:g})")
                values = (low, high)
        except ValueError as e:
            raise ConfigError(f"invalid {flag}: {spec!r} ({e})", field=field) from None
        domain = Domain(field, kind, values)
        for value in domain.extremes():  # the setting itself must take every value the sweep may give it
            try:
                _apply(base, {field: value})
            except ConfigError as e:
                why = str(e).split(" (", 1)[1].rstrip(")") if " (" in str(e) else str(e)
                raise ConfigError(f"invalid {flag}: {spec!r} gives {value!r}, which it refuses ({why})",
                                  field=field) from None
        out[field] = domain
    return out


def trial_resources(cfg: TrainConfig):
    """The placement group a trial of `cfg` reserves: a bundle for its driver and server (they
    need next to no CPU), then one per worker replica, packed (spread with --spread)."""
    from ray.tune import PlacementGroupFactory
    worker = {"CPU": cfg.cpus_per_worker}
    if cfg.gpus_per_worker:
        worker["GPU"] = cfg.gpus_per_worker
    return PlacementGroupFactory([{"CPU": 0.01}] + [dict(worker) for _ in range(cfg.replicas)],
                                 strategy="SPREAD" if cfg.spread else "PACK")


def _apply(base: TrainConfig, sampled: dict) -> TrainConfig:
    """The base settings with a trial's sampled ones (a model by widths comes as a tuple)."""
    return base.replace(**{k: list(v) if isinstance(v, tuple) else v for k, v in sampled.items()})


class _Report(Callback):
    """The trial's callback: each evaluation to Tune."""

    def on_evaluation(self, record):
        from ray import tune
        metrics = {"step": record["step"], "epoch": record.get("epoch", record["step"])}
        for key in ("test_loss", "test_accuracy", "train_loss", "train_accuracy"):
            if key in record:
                metrics[key] = record[key]
        tune.report(metrics)  # a trial that Tune stops ends here (SystemExit): its run stops


def _trainable(base: TrainConfig, dataset, model, loss, sweep_folder: Path):
    def trial(sampled: dict) -> None:
        from ray import tune
        from .distributed import Trainer
        from .distributed.trainer import run_key
        for name in ("dptrain.metrics", "dptrain.distributed.trainer"):  # a sweep logs per trial, not per step
            logging.getLogger(name).setLevel(logging.WARNING)
        folder = Path(tune.get_context().get_trial_dir()) / "run"  # Tune copies it into the sweep's folder
        kept = trial_run_folder(sweep_folder, folder.parent.name)
        if not _has_checkpoints(folder) and _has_checkpoints(kept) and kept.resolve() != folder.resolve():
            # a restored sweep (its driver died): Tune's folder for the trial is new and empty, the
            # sweep's copy of the run holds its checkpoints (where the sweep's folder can be seen)
            shutil.copytree(kept, folder, dirs_exist_ok=True)
        cfg = _apply(base, sampled).replace(out=str(folder), address=None)
        trainer = Trainer(cfg, dataset=dataset, model=model, loss=loss, resume=_has_checkpoints(folder),
                          callbacks=[_Report()])
        trainer.segment_key = run_key(str(kept))
        trainer.fit()
    return trial


def _has_checkpoints(run: Path) -> bool:
    from .checkpoint import list_checkpoints
    return bool(list_checkpoints(run / "checkpoints"))


def trial_run_folder(sweep_folder: Path, trial: str) -> Path:
    """A trial's run folder in the sweep's folder (where the driver finds it, and the key of the
    segments its run names: release_shared_memory)."""
    return Path(sweep_folder) / trial / "run"


@dataclasses.dataclass
class TuneResult:
    """What `tune` returns: each trial's row (its sampled settings, last reported metrics, how it
    ended, its run folder), the best of them, and the sweep's folder."""

    rows: list
    best: dict | None
    folder: str
    metric: str
    mode: str

    def table(self) -> str:
        if not self.rows:
            return "(no trials)"
        keys = sorted({k for r in self.rows for k in r["config"]})
        head = ["trial", *keys, self.metric, "evaluations", "ended"]
        lines = [head]
        for r in self.rows:
            value = r["metrics"].get(self.metric)
            lines.append([r["trial"], *[_show(r["config"].get(k)) for k in keys],
                          "-" if value is None else f"{value:.4f}", str(r["evaluations"]), r["ended"]])
        widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
        return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)


def _show(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def tune(cfg: TrainConfig, space: dict, *, samples: int = 1, scheduler: str = "asha", metric: str = "test_accuracy",
         mode: str = "max", out: str | None = None, grace_period: int = 1, reduction_factor: float = 4,
         max_concurrent: int | None = None, dataset=None, model=None, loss=None, verbose: int = 1,
         restore: bool = False) -> TuneResult:
    """Sweep `space` over the base `cfg` with Ray Tune (the module's docstring says how); on the
    Ray this process is connected to, or an embedded one (cfg.address and cfg.cpus as for a run)."""
    from .blocks import load_data, prepare
    domains = parse_space(space, cfg)
    if not (isinstance(samples, int) and samples >= 1):
        raise ConfigError(f"invalid samples: {samples!r} (trials per point of the space: a whole number >= 1)",
                          field="samples")
    if max_concurrent is not None and not (isinstance(max_concurrent, int) and max_concurrent >= 1):
        raise ConfigError(f"invalid max_concurrent: {max_concurrent!r} (trials at once: a whole number >= 1)",
                          field="max_concurrent")
    if scheduler not in ("asha", "fifo"):
        raise ConfigError(f"invalid scheduler: {scheduler!r} (asha or fifo)", field="scheduler")
    if mode not in ("max", "min"):
        raise ConfigError(f"invalid mode: {mode!r} (max or min)", field="mode")
    data = dataset if dataset is not None else load_data(cfg)
    reported = ("test_loss", "test_accuracy") if data.task == "classification" else ("test_loss",)
    if metric not in reported:
        raise ConfigError(f"invalid metric: {metric!r} (no evaluation reports it: each reports "
                          f"{' and '.join(reported)} for {data.name})", field="metric")
    if grace_period < 1 or reduction_factor <= 1:
        raise ConfigError(f"invalid grace_period/reduction_factor: {grace_period}, {reduction_factor} "
                          "(ASHA needs grace_period >= 1 and reduction_factor > 1)", field="grace_period")
    prepare(cfg, data, model, loss)  # a bad model or loss fails here, before Ray
    for d in domains.values():  # and so does a sampled model that does not fit the data
        if isinstance(d, Domain) and d.field == "model":
            for value in d.values:
                prepare(_apply(cfg, {"model": value}), data, model, loss)

    folder = Path(out or Path("runs") / f"tune-{datetime.datetime.now():%Y%m%d-%H%M%S}").absolute()
    if restore and not (folder / "sweep.json").is_file():
        raise ConfigError(f"invalid restore: {folder} holds no sweep (no sweep.json)", field="restore")
    if not restore and folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"invalid out: {folder} is not empty: give a new folder (or --restore it)", field="out")

    import ray
    from ray import tune as rtune
    from .distributed.cluster import check_resources, connect, embedded_cpus
    largest = max([cfg.replicas] + [_apply(cfg, {d.field: v}).replicas for d in domains.values()
                                    if isinstance(d, Domain) and d.field in ("workers", "backup_workers")
                                    for v in d.values])
    started = connect(cfg.address, num_cpus=embedded_cpus(largest, cfg.cpus_per_worker, cfg.cpus))
    try:
        check_resources(largest, cfg.cpus_per_worker, cfg.gpus_per_worker)
        folder.mkdir(parents=True, exist_ok=True)
        if not restore:
            (folder / "sweep.json").write_text(json.dumps({
                "base": cfg.to_dict(), "space": {k: v for k, v in space.items() if isinstance(v, str)},
                "samples": samples, "scheduler": scheduler, "metric": metric, "mode": mode,
                "grace_period": grace_period, "reduction_factor": reduction_factor}, indent=2) + "\n")
        # the data the driver loaded goes to every trial (no trial reads a file that may be on this
        # machine only), unless a searched setting changes what the data is
        shipped = data if not DATA_FIELDS & set(domains) else None
        trainable = rtune.with_resources(_trainable(cfg, shipped, model, loss, folder),
                                         lambda sampled: trial_resources(_apply(cfg, sampled)))
        if restore:
            tuner = rtune.Tuner.restore(str(folder), trainable, resume_unfinished=True, restart_errored=True)
        else:
            sched = None
            if scheduler == "asha":
                from ray.tune.schedulers import ASHAScheduler
                sched = ASHAScheduler(max_t=10**6, grace_period=grace_period, reduction_factor=reduction_factor)
            tuner = rtune.Tuner(
                trainable,
                param_space={k: (d.to_tune() if isinstance(d, Domain) else d) for k, d in domains.items()},
                tune_config=rtune.TuneConfig(metric=metric, mode=mode, num_samples=samples, scheduler=sched,
                                             max_concurrent_trials=max_concurrent,
                                             trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
                run_config=rtune.RunConfig(name=folder.name, storage_path=str(folder.parent), verbose=verbose))
        result = _result(tuner.fit(), folder, metric, mode)
        release_shared_memory([trial_run_folder(folder, r["trial"]) for r in result.rows if r["run"]])
    finally:
        if started:
            ray.shutdown()
    _write(result)
    return result


def _trial_name(trial) -> str:
    """A trial's name and folder: its id (its settings are in the results table and its run folder)."""
    return f"trial_{trial.trial_id}"


def _result(grid, folder: Path, metric: str, mode: str) -> TuneResult:
    rows = []
    for r in grid:
        trial = Path(r.path).name if r.path else "?"
        run = Path(r.path) / "run" if r.path else None
        done = run is not None and (run / "summary.json").exists()
        metrics = dict(r.metrics or {})
        ended = "error" if r.error else ("done" if done else "stopped early")
        rows.append({"trial": trial, "config": dict(r.config or {}), "metrics": {k: metrics[k] for k in
                     ("step", "epoch", "test_loss", "test_accuracy", "train_loss", "train_accuracy") if k in metrics},
                     "evaluations": metrics.get("training_iteration", 0), "ended": ended,
                     "run": str(run) if run else None, "error": str(r.error) if r.error else None})
    scored = [r for r in rows if r["metrics"].get(metric) is not None and not r["error"]]  # as Tune's "last" scope
    best = (max if mode == "max" else min)(scored, key=lambda r: r["metrics"][metric]) if scored else None
    return TuneResult(rows, best, str(folder), metric, mode)


def _write(result: TuneResult) -> None:
    folder = Path(result.folder)
    (folder / "results.json").write_text(json.dumps({"metric": result.metric, "mode": result.mode,
                                                     "best": result.best, "trials": result.rows}, indent=2) + "\n")
    keys = sorted({k for r in result.rows for k in r["config"]})
    with open(folder / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", *keys, "test_loss", "test_accuracy", "evaluations", "ended", "run"])
        for r in result.rows:
            w.writerow([r["trial"], *[r["config"].get(k) for k in keys], r["metrics"].get("test_loss"),
                        r["metrics"].get("test_accuracy"), r["evaluations"], r["ended"], r["run"]])


def release_shared_memory(runs: list, wait_s: float = 30.0) -> int:
    """Remove, on every live node, the shared-memory segments of the trials' runs (their run
    folders, `runs`) once no process maps them: a trial Tune stops ends with its actor, and the
    processes of its fleet, killed with it, leave their segments. Waits up to `wait_s` for those
    processes to go; how many segments were removed."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from .distributed.trainer import run_key

    prefixes = [f"dptrain-{run_key(str(run))}-" for run in runs]

    @ray.remote(num_cpus=0)
    def release(prefixes: list, wait_s: float) -> int:
        import time
        from dptrain.distributed.transport import shm
        removed, deadline = 0, time.monotonic() + wait_s
        while True:
            removed += sum(len(shm.sweep_orphans(p, min_age_s=0)) for p in prefixes)
            if not any(shm.names(p) for p in prefixes) or time.monotonic() > deadline:
                return removed
            time.sleep(0.2)
    if not prefixes:
        return 0
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    refs = [release.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(prefixes, wait_s)
            for n in nodes]
    try:
        return sum(ray.get(refs, timeout=wait_s + 30))
    except Exception as e:  # a node lost meanwhile: its segments went with it
        log.warning("could not release the trials' shared memory on every node: %s", e)
        return 0


# --------------------------------------------------------------------------- the CLI

def split_space(argv: list) -> tuple:
    """(argv without the searched settings, {field: spec}): `--lr loguniform:1e-4:1e-1` and
    `--workers=choice:1,2` are the search space; everything else is for the parser. A numeric
    setting given WORD:... is taken for a search space too, so that a misspelt distribution is
    named as one (text settings take such values: --compress topk:0.01)."""
    types = _field_types()

    def searched(flag: str, value: str) -> bool:
        field = flag[2:].replace("-", "_")
        numeric = any(t in types.get(field, "") for t in ("int", "float"))
        return is_spec(value) or (numeric and re.match(r"^[A-Za-z_]+:", value) is not None)

    rest, space, i = [], {}, 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--") and "=" in token and searched(*token.split("=", 1)):
            name, spec = token[2:].split("=", 1)
            space[name.replace("-", "_")] = spec
        elif token.startswith("--") and i + 1 < len(argv) and searched(token, argv[i + 1]):
            space[token[2:].replace("-", "_")] = argv[i + 1]
            i += 1
        else:
            rest.append(token)
        i += 1
    return rest, space


def add_parser(sub) -> None:
    from .cli import add_config_flags
    p = sub.add_parser("tune", help="a Ray Tune sweep whose trials are dptrain runs",
                       description="Sweep settings with Ray Tune: each trial is a dptrain run of the settings "
                                   "given, with the searched ones sampled. Any setting of dptrain train takes a "
                                   "value or a search space: uniform:LOW:HIGH, loguniform:LOW:HIGH, "
                                   "randint:LOW:HIGH, choice:A,B,... or grid:A,B,... (e.g. --lr "
                                   "loguniform:1e-4:1e-1 --workers choice:1,2,4).")
    add_config_flags(p, skip=("progress",))
    p.add_argument("--samples", type=int, default=1, metavar="N", help="trials per point of the space (default: 1)")
    p.add_argument("--scheduler", choices=("asha", "fifo"), default="asha",
                   help="asha stops poor trials at an evaluation; fifo runs every trial to its end (default: asha)")
    p.add_argument("--metric", default="test_accuracy", metavar="NAME",
                   help="the reported figure trials are compared by: test_accuracy or test_loss (default: "
                        "test_accuracy)")
    p.add_argument("--mode", choices=("max", "min"), default="max", help="maximize or minimize --metric")
    p.add_argument("--grace-period", type=int, default=1, metavar="N",
                   help="ASHA: evaluations a trial always gets (default: 1)")
    p.add_argument("--reduction-factor", type=float, default=4, metavar="X",
                   help="ASHA: about 1/X of the trials go on at each rung (default: 4)")
    p.add_argument("--max-concurrent", type=int, default=None, metavar="N", help="trials at once (default: "
                                                                                 "what the cluster fits)")
    p.add_argument("--restore", action="store_true",
                   help="continue the sweep in --out after its driver died (Tune's restore: unfinished trials "
                        "resume from their run folders' checkpoints)")
    p.add_argument("--quiet", action="store_true", help="no Tune status tables, only the results")


def run(args) -> int:
    from .cli import config_from_args
    cfg = config_from_args(args)
    if args.restore:
        if not args.out:
            raise ConfigError("invalid --restore: give the sweep's folder with --out", field="restore")
        path = Path(args.out) / "sweep.json"
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"invalid --restore: {path} cannot be read ({e})", field="restore") from None
        cfg = TrainConfig.from_dict({**saved["base"], "address": args.address, "cpus": args.cpus})
        args.space = saved["space"]
        for key in ("samples", "scheduler", "metric", "mode", "grace_period", "reduction_factor"):
            setattr(args, key, saved[key])
    result = tune(cfg.replace(out=None), args.space, samples=args.samples, scheduler=args.scheduler,
                  metric=args.metric, mode=args.mode, out=args.out, grace_period=args.grace_period,
                  reduction_factor=args.reduction_factor, max_concurrent=args.max_concurrent,
                  verbose=0 if args.quiet else 1, restore=args.restore)
    print(result.table())
    if result.best is not None:
        settings = " ".join(f"--{k.replace('_', '-')} {_show(v) if not isinstance(v, (list, tuple)) else ','.join(map(str, v))}"
                            for k, v in sorted(result.best["config"].items()))
        print(f"best: {result.metric} {result.best['metrics'][result.metric]:.4f} with {settings or 'the base settings'}"
              f" (trial {result.best['trial']}); its run folder: {result.best['run']}")
    print(f"results: {result.folder}/ (results.csv, results.json, one folder per trial)")
    return 0 if result.best is not None else 1
