"""The command line: `dptrain train`, `dptrain sample` (dptrain/sample.py), `dptrain scale` (dptrain/scaling/scale.py), `dptrain stragglers`
(dptrain/scaling/stragglers.py), `dptrain bench` (dptrain/scaling/bench.py).

    dptrain train --dataset mnist1d --workers 4 --epochs 10
    dptrain train --address auto ...            # join a running `ray start` cluster
    dptrain train --help                        # every flag

Bad input (flags, data files, an unreachable cluster) prints one line naming the
problem and exits with status 2; a failure during training exits with 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from dptrain_console import install_signal_handlers, interrupted, signalled

from .auth import use_token_auth_for
from .callbacks import Callback
from .config import ConfigError, TrainConfig, is_widths, parse_model
from .data import DataError
from .rundir import RunFolderError, default_out
from .storage import fetch_run, is_uri

log = logging.getLogger("dptrain")

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (no usage dump) and exit status 2."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _model(text: str):
    """Widths ("40,256,256,10") become a list; a name or file.py:function stays text (TrainConfig checks it)."""
    if is_widths(text):
        try:
            return parse_model(text)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix("invalid model: ")) from None
    return text


def add_config_flags(parser: argparse.ArgumentParser, skip=()) -> None:
    """One flag per TrainConfig field (kebab-case), with the field's help and default."""
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "")
        default = f.default
        kind = str(f.type)
        if f.name == "model":
            parser.add_argument(flag, type=_model, default=None, metavar="SPEC",
                                help=helptext + " Sizes comma-separated, e.g. 40,256,256,10.")
        elif f.name == "loss":
            parser.add_argument(flag, default=None, metavar="SPEC", help=helptext)
        elif kind == "bool":
            if f.name == "progress":
                default = None  # decided at run time: on when stderr is a terminal
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=helptext)
        else:
            typ = int if "int" in kind else float if "float" in kind else str
            metavar = {int: "N", float: "X", str: "NAME"}[typ]
            if f.name in ("data", "out"):
                metavar = "FILE" if f.name == "data" else "DIR"
            elif f.name == "betas":
                metavar = "B1,B2"
            elif f.name == "address":
                metavar = "auto|HOST:PORT"
            suffix = f" (default: {default})" if default is not None else ""
            parser.add_argument(flag, type=typ, default=default, metavar=metavar, help=helptext + suffix)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dptrain", description="Data-parallel training on Ray with dptrain's own autograd engine.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train a model (embedded local Ray, or a cluster with --address)",
                           description="Train a model (an MLP by widths, a built-in CNN or transformer, or "
                                       "your own dptrain.nn.Module from file.py:function) with synchronous data "
                                       "parallelism: N worker actors compute gradients, a parameter server "
                                       "averages them and steps the optimizer. Writes config.json, "
                                       "metrics.jsonl, summary.json and params.npz to --out.")
    add_config_flags(train)
    train.add_argument("--quiet", action="store_true", help="only warnings and the final summary")
    train.add_argument("--resume", metavar="DIR", default=None,
                       help="continue the run in DIR, or in STORAGE/<name> (--storage; copied to a local folder "
                            "first), from its config.json and newest intact checkpoint; flags "
                            "of where and how it runs (--workers, --servers, --address, --transport, ...) apply, "
                            "flags that would change its arithmetic are refused")
    from . import sample, sweep
    from .scaling import bench, scale, stragglers  # these commands' flags live with them
    sample.add_parser(sub)
    sweep.add_parser(sub)
    scale.add_parser(sub)
    stragglers.add_parser(sub)
    bench.add_parser(sub)
    return parser


# --------------------------------------------------------------------------- commands

class ProgressBar(Callback):
    """The terminal's progress bar (tqdm): the loss and throughput of each step; a replay takes it
    back to the step run again."""

    bar = None

    def on_start(self, run) -> None:
        from tqdm import tqdm
        self.bar = tqdm(total=run.steps, initial=run.first_step, unit="step", dynamic_ncols=True, leave=False)

    def on_step(self, record: dict) -> None:
        self.bar.update(record["step"] + 1 - self.bar.n)
        rate = record["count"] / max(record["time_s"], 1e-9)
        self.bar.set_postfix_str(f"loss {record['loss']:.4f} | {rate:,.0f} samples/s", refresh=False)

    def on_rewind(self, step: int, record: dict) -> None:
        self.bar.n = step
        self.bar.refresh()

    def on_end(self, result) -> None:
        if self.bar is not None:
            self.bar.close()

    on_failure = on_end


# What a resume may change: where and how the steps run, not what they compute. (In relaxed runs
# the worker count decides which examples each update uses, so there it is the run's own.)
RESUME_PLACEMENT = ("workers", "servers", "spread", "address", "transport", "cpus", "cpus_per_worker",
                    "gpus_per_worker", "device", "progress", "tensorboard", "mlflow", "mlflow_experiment", "storage",
                    "log_every", "checkpoint_every", "keep_checkpoints", "max_failures", "step_timeout",
                    "on_worker_loss", "eval_batch_size", "eval_every", "eval_batches", "micro_batch", "update_threads")


def _resumed_config(folder: str, given: dict) -> TrainConfig:
    """The run's config.json with the placement settings `given` on the command line applied;
    ConfigError naming the file or the flag for anything else."""
    path = Path(folder) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"invalid resume: {path} not found (is {folder} a dptrain run folder?)",
                          field="resume") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"invalid resume: {path} is unreadable ({e})", field="resume") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"invalid resume: {path} holds a JSON {type(saved).__name__}, not a run's settings",
                          field="resume")
    saved["out"] = str(Path(folder))
    try:
        run = TrainConfig.from_dict(saved)
    except ConfigError as e:
        raise ConfigError(f"invalid resume: {path}: {e}", field="resume") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid resume: {path}: not a run's settings ({e})", field="resume") from None
    typed = TrainConfig.from_dict({**saved, **given})  # the flags as the config reads them ("0.9,0.99" a list)
    refused = [name for name in given if name not in RESUME_PLACEMENT or
               (name == "workers" and run.relaxed)]
    changed = [name for name in refused if getattr(typed, name) != getattr(run, name)]
    if changed:
        flags = ", ".join(f"--{n.replace('_', '-')} {given[n]!r} ({saved.get(n)!r} in {path})" for n in changed)
        raise ConfigError(f"invalid resume: {flags}: a resumed run keeps the settings that decide its arithmetic; "
                          "it takes only where and how it runs (" + ", ".join(
                              "--" + n.replace("_", "-") for n in RESUME_PLACEMENT) + "; not --workers in a relaxed "
                          "run): start a new run for other settings", field="resume")
    return run.replace(**{k: getattr(typed, k) for k in given if k in RESUME_PLACEMENT})


def _given_config_flags(argv: list) -> dict:
    """The TrainConfig fields whose flags `argv` (the train command's) sets, with their values,
    whatever the value (a default typed out counts too)."""
    absent = object()  # not a string: argparse would convert a string default with the flag's type
    flags = _Parser(prog="dptrain train", add_help=False)
    add_config_flags(flags)
    flags.set_defaults(**{f.name: absent for f in dataclasses.fields(TrainConfig)})
    known, _ = flags.parse_known_args(argv)
    return {name: value for name, value in vars(known).items() if value is not absent}


def run_train(args) -> int:
    cfg = args.cfg
    from .blocks import load_data

    dataset = load_data(cfg)  # bad data is reported before anything starts (the trainer checks the rest)
    from .distributed import Trainer  # imports Ray: only when needed

    bar = ProgressBar() if cfg.progress else None
    trainer = Trainer(cfg.replace(out=cfg.out or default_out()), dataset=dataset, resume=bool(args.resume),
                      callbacks=[bar])
    if bar is not None:
        from tqdm.contrib.logging import logging_redirect_tqdm
        with logging_redirect_tqdm():
            result = trainer.fit()
    else:
        result = trainer.fit()
    s = result.summary
    acc = (f" | train acc {s['train_accuracy']:.4f} | test acc {s['test_accuracy']:.4f}"
           if "test_accuracy" in s else "")
    print(f"done: {s['steps']} steps on {s['workers']} worker(s) in {s['wall_s']:.1f} s "
          f"({s['samples_per_s']:,.0f} samples/s) | train loss {s['train_loss']:.4f} | "
          f"test loss {s['test_loss']:.4f}{acc}")
    print(f"results: {trainer.cfg.out}/ (config.json, metrics.jsonl, summary.json, params.npz)")
    if trainer.mirror is not None:
        unwritten = sorted(trainer.mirror.unwritten)
        print(f"stored: {trainer.mirror.storage.uri}/" + (f" (not all of it: {', '.join(unwritten)} failed)"
                                                         if unwritten else ""))
    return 0


def main(argv=None) -> int:
    install_signal_handlers()  # again: the console entry point did, a caller such as scripts/train.py may not
    command = "dptrain"
    try:
        parser = build_parser()
        argv = list(sys.argv[1:] if argv is None else argv)
        space = None
        if argv and argv[0] == "tune":  # a setting's search space is not its value: taken out before parsing
            from .sweep import split_space
            argv, space = split_space(argv)
        args = parser.parse_args(argv)
        args.space = space
        command = f"dptrain {args.command}"
        if args.command == "train" and args.resume:  # which settings the user typed, to apply or refuse them
            args.given = _given_config_flags(argv[argv.index("train") + 1:])
        _configure_logging(quiet=getattr(args, "quiet", False))
        if args.command == "train" and args.progress is None:
            args.progress = sys.stderr.isatty() and not args.quiet
        return _run(args, argv)
    except BaseException as e:  # a signal, or an error C code raised in place of one (dptrain_console)
        if (signal_error := signalled(e)) is None:
            raise
        return interrupted(command, signal_error, "checkpoints, if any, are kept (--resume continues)")


def _configure_logging(quiet: bool) -> None:
    """dptrain's own messages at INFO (WARNING with --quiet); other libraries' only from WARNING on
    (mnist1d's matplotlib announced its font cache on a fresh machine, inside a one-line error)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def _run(args, argv) -> int:
    if args.command == "sample":  # no Ray
        from . import sample
        try:
            return sample.run(args)
        except (ConfigError, DataError) as e:
            return _bad_input(args, e)
    try:
        if args.command == "train":  # the run's settings first: a resume's address is in its config.json
            if args.resume and is_uri(args.resume):  # a run kept on storage: copied here first
                args.resume = str(fetch_run(args.resume))
            args.cfg = _resumed_config(args.resume, args.given) if args.resume else config_from_args(args)
        use_token_auth_for(args.cfg.address if args.command == "train" else getattr(args, "address", None))
        from .distributed.cluster import ClusterError  # imports Ray, which reads RAY_AUTH_MODE once
        from .distributed.trainer import TrainingError
    except ConfigError as e:
        return _bad_input(args, e)
    try:
        if args.command == "train":
            return run_train(args)
        if args.command == "bench":
            from .scaling import bench
            return bench.run(args)
        if args.command == "tune":
            from . import sweep
            return sweep.run(args)
        from .scaling import scale, stragglers
        args.argv = argv[1:]
        return (stragglers if args.command == "stragglers" else scale).run(args)
    except (ConfigError, DataError, ClusterError) as e:
        return _bad_input(args, e)
    except (TrainingError, RunFolderError) as e:
        print(f"dptrain {args.command}: training failed: {e}", file=sys.stderr)
        return EXIT_FAILED


def _bad_input(args, e: Exception) -> int:
    message = str(e)
    if isinstance(e, ConfigError) and e.field:  # name the flag the user typed
        message = message.replace(f"invalid {e.field}:", f"invalid --{e.field.replace('_', '-')}:", 1)
    print(f"dptrain {args.command}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
