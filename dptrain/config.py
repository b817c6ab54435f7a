"""TrainConfig: every setting of a training run, checked when it is made."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import compress
from .backend import DEVICES
from .optim import OPTIMIZERS, SCHEDULES
from .tensor import DTYPES


ADAM_OPTIMIZERS = ("adam", "adamw")  # the ones that take betas and eps
ADAM_EPS = 1e-8  # their default epsilon (torch.optim's)


def _f(default, help: str):
    """A config field with its help text (the CLI's --help shows it)."""
    return field(default=default, metadata={"help": help})


def _choice(default: str, choices, help: str):
    """A field taking one of `choices`: stated here only, checked in __post_init__, listed in
    the help text ("{choices}" in `help` is where)."""
    choices = tuple(choices)
    return field(default=default, metadata={"help": help.format(choices=_or(choices)), "choices": choices})


def choices(name: str) -> tuple:
    """The valid values of TrainConfig field `name` (for command lines that offer them)."""
    return next(f.metadata["choices"] for f in dataclasses.fields(TrainConfig) if f.name == name)


def _or(choices) -> str:
    return ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else choices[0]


class ConfigError(ValueError):
    """A setting is invalid; the message names the setting and the value.

    `field` is the TrainConfig field at fault (the CLI names its flag instead).
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass
class TrainConfig:
    """A training run. The CLI's flags mirror these fields in kebab-case."""

    dataset: str = _f("mnist1d",
        "Built-in dataset: regression, moons, spirals, mnist1d, digits or synthetic (784 "
        "features, 10 classes); ignored when `data` is set.")
    data: Optional[str] = _f(None,
        "A .npz (arrays x, y[, x_test, y_test]) or .csv (header row, label column last) file; a .txt "
        "file (characters); a .bin token stream (read in place: data larger than memory); a folder "
        "of x.npy and y.npy (read in place); Parquet files, a folder or a glob of them, or a folder of CSV files.")
    label: Optional[str] = _f(None, "The label column's name in .csv or Parquet data (default: the last column).")
    features: Optional[str] = _f(None,
        "The input columns of .csv or Parquet data, comma-separated (default: every column but the label); "
        "a single column of fixed-shape arrays is an input of that shape.")
    seq_len: int = _f(64, "Tokens per example of a .txt or .bin data file (next-token prediction).")
    token_dtype: str = _f("uint16", "The token ids' type in a .bin data file: uint16 or uint32.")
    vocab_size: Optional[int] = _f(None,
        "The vocabulary of a .bin data file (default: nanoGPT's meta.pkl beside it, else the largest id + 1).")
    model: Optional[object] = _f(None,
        "Layer sizes of an MLP (e.g. [40, 256, 256, 10]), a built-in model (mlp, cnn1d, cnn2d, transformer) "
        "or path/to/file.py:function / package.module:function returning a dptrain.nn.Module; "
        "default [features, 256, 256, outputs].")
    loss: Optional[str] = _f(None,
        "cross_entropy, mse, or path/to/file.py:function / package.module:function (output, target) -> "
        "the SUM of the per-example losses; default by the task (cross_entropy for classes, mse otherwise).")
    activation: str = _choice("relu", ("relu", "tanh", "sigmoid"), "Hidden-layer activation: {choices}.")
    n_layer: int = _f(4, "--model gpt: transformer blocks.")
    n_head: int = _f(4, "--model gpt: attention heads per block (they divide --n-embd).")
    n_embd: int = _f(128, "--model gpt: the embedding width.")
    dropout: float = _f(0.0, "--model gpt: dropout after the embeddings, attention and each MLP.")
    workers: int = _f(1, "Data-parallel worker actors.")
    batch_size: int = _f(256, "Global batch size, split over the workers.")
    update_threads: int = _f(0,
        "Threads of the optimizer's update (the parameter server's, a shard's, one process's): disjoint "
        "ranges of the flat buffer at once, the same numbers bit for bit, at least 8 blocks of 2^16 "
        "parameters each. 0 (auto): the server takes one more thread per worker on its node, whose "
        "cores wait for the update in a synchronous step (one thread with --staleness or "
        "--backup-workers); a shard and one process take one.")
    micro_batch: Optional[int] = _f(None,
        "Examples per forward and backward pass in a worker: its share of the batch runs in "
        "micro-batches of at most this many and their gradients are added (gradient accumulation): "
        "the same step, with the activations of fewer examples in memory at once.")
    epochs: int = _f(10, "Passes over the training set (ignored when `steps` is set).")
    steps: Optional[int] = _f(None, "Total optimizer steps; overrides `epochs`.")
    target_accuracy: Optional[float] = _f(None,
        "Stop at the first epoch end whose test accuracy reaches this (time-to-accuracy runs).")
    lr: float = _f(0.1, "Peak learning rate.")
    optimizer: str = _choice("sgd", OPTIMIZERS, "{choices}.")
    momentum: float = _f(0.9, "SGD momentum.")
    nesterov: bool = _f(False, "Nesterov momentum (SGD).")
    weight_decay: float = _f(0.0, "L2 weight decay (decoupled for adamw).")
    decay_params: str = _choice("all", ("all", "matrices"),
        "Which parameters --weight-decay applies to ({choices}): all, or matrices: those of two or "
        "more dimensions (weight matrices, kernels, embeddings), not biases or norms (nanoGPT's rule).")
    clip_grad_norm: Optional[float] = _f(None,
        "Clip the mean gradient to this global L2 norm before the update, as "
        "torch.nn.utils.clip_grad_norm_ does (default: no clipping; each step's grad_norm is "
        "recorded either way).")
    betas: Optional[object] = _f(None,
        "Adam and AdamW's (beta1, beta2), as B1,B2 (e.g. 0.9,0.99); default 0.9,0.999.")
    eps: float = _f(ADAM_EPS, "Adam and AdamW's epsilon, added to the root of the second moment.")
    schedule: str = _choice("constant", SCHEDULES, "Learning-rate schedule: {choices}.")
    warmup: int = _f(0, "Linear warm-up steps.")
    step_size: int = _f(1000, "Steps between decays of the `step` schedule.")
    gamma: float = _f(0.1, "Decay factor of the `step` schedule.")
    min_lr: float = _f(0.0, "The cosine schedule's final learning rate: after the warm-up it falls from `lr` "
                            "to this (nanoGPT's min_lr).")
    seed: int = _f(0, "Seeds the initialisation, the sampler and any split of user data.")
    dtype: str = _choice("float32", DTYPES, "{choices}.")
    device: str = _choice("cpu", DEVICES, "{choices} (cupy on a GPU).")
    log_every: int = _f(10, "Steps between log lines.")
    eval_batch_size: int = _f(4096, "Examples per forward pass during evaluation.")
    eval_every: Optional[int] = _f(None,
        "Steps between evaluations of the held-out split, besides each epoch's end (default: epoch "
        "ends only).")
    eval_batches: Optional[int] = _f(None,
        "Evaluate a fixed, seeded subset of this many batches of --eval-batch-size examples of each "
        "split, the same at every evaluation: an estimate, as nanoGPT's eval_iters (default: the "
        "held-out split whole, the training split as many batches as the held-out split has).")
    out: Optional[str] = _f(None, "Directory for metrics.jsonl, config.json and the final parameters.")
    storage: Optional[str] = _f(None,
        "Keep the run folder in STORAGE/<the run folder's name> too: a shared path, file://PATH or "
        "s3://BUCKET/PREFIX (AWS_* variables for the endpoint and credentials); --resume STORAGE/<name> "
        "continues it from any machine.")
    # ---- distributed settings (used by dptrain.distributed)
    address: Optional[str] = _f(None,
        "Ray cluster address: auto or HOST:PORT; none starts an embedded local Ray.")
    cpus: Optional[int] = _f(None,
        "Logical CPUs of the embedded local Ray (default: enough for the workers, at least "
        "this machine's count).")
    cpus_per_worker: float = _f(1.0, "CPUs Ray reserves for each worker (fractions allowed).")
    gpus_per_worker: float = _f(0.0,
        "GPUs Ray reserves for each worker (fractions allowed); > 0 implies device cuda.")
    spread: bool = _f(False, "Place workers on different nodes where possible (a SPREAD placement group).")
    transport: str = _choice("auto", ("auto", "object_store", "compiled_graph"),
        "How parameters and gradients travel ({choices}): auto, shared memory for CPU workers on the "
        "server's node and Ray's object store for the others; object_store, always Ray objects; "
        "compiled_graph, a Ray Compiled Graph (measured slower; docs/scaling.md).")
    servers: int = _f(1,
        "Parameter servers K: with K > 1 each of K server actors (one per node where there are several) "
        "owns a contiguous 1/K of the parameters and their optimizer state, and workers exchange each "
        "server's slice with it directly over the object store; where every shard and worker is on one "
        "node (transport auto, dense gradients) the shards update their ranges of the node's shared "
        "memory in place instead (docs/design.md).")
    progress: bool = _f(False, "Show a progress bar (the CLI turns it on in a terminal).")
    tensorboard: Optional[str] = _f(None,
        "Write TensorBoard event files in DIR/<the run folder's name> (view: tensorboard --logdir DIR).")
    mlflow: Optional[str] = _f(None,
        "Log the run to MLflow: a tracking server's http(s)://host:port, a database (sqlite:///path.db), "
        "or a folder (an SQLite store mlflow.db and artifacts/ in it).")
    mlflow_experiment: str = _f("dptrain", "The MLflow experiment the run is logged in (made if missing).")
    # ---- reliability
    checkpoint_every: int = _f(0,
        "Save the server's full state to <out>/checkpoints every N steps (0: only at the end; "
        "needs --out).")
    keep_checkpoints: int = _f(3, "Checkpoints kept (the newest).")
    max_failures: int = _f(3, "Worker or server failures survived before the run stops with an error.")
    step_timeout: float = _f(300.0,
        "Seconds a worker may take for one step before it is treated as failed (hung).")
    on_worker_loss: str = _choice("restart", ("restart", "shrink"),
        "{choices}. restart: replace a lost worker (another node if its node is gone); shrink: go on "
        "with the others, the same global batch split among them.")
    straggler: Optional[str] = _f(None,
        "Make a worker slower, for experiments: RANK:FACTOR (worker RANK takes FACTOR times its compute "
        "time every step) or random:FACTOR (each step a worker drawn from the seed and the step).")
    staleness: float = _f(0,
        "Bounded staleness TAU (a whole number, or inf): 0 is the exact synchronous step; TAU > 0 lets "
        "workers take the next shards of the coming steps as soon as they are free, computing on "
        "parameters up to TAU versions old (docs/stragglers.md).")
    backup_workers: int = _f(0,
        "B backup workers: workers + B replicas compute every step, each on its 1/(workers + B) of the "
        "batch, and the server averages the first `workers` gradients to arrive (docs/stragglers.md).")
    compress: str = _f("none",
        "Compress the gradients workers send: none, fp16, bf16 (2 bytes an entry) or topk:RATIO (the "
        "largest RATIO of entries, 0 < RATIO <= 0.5, with error feedback); parameters stay exact.")
    on_nonfinite: str = _choice("stop", ("stop", "skip"),
        "A NaN or Inf loss or gradient ({choices}): stop, naming the step and worker (checkpoints are "
        "kept), or skip the step.")

    def __post_init__(self):
        def bad(name, value, why):
            raise ConfigError(f"invalid {name}: {value!r} ({why})", field=name)

        if self.data is None and not self.dataset:
            bad("dataset", self.dataset, "give a dataset name or a data file")
        if self.model is not None:
            if isinstance(self.model, str) and is_widths(self.model):
                self.model = parse_model(self.model)
            if isinstance(self.model, str):
                check_reference(self.model, "model", BUILTIN_MODEL_NAMES)
            else:
                if isinstance(self.model, (list, tuple)) and not is_widths(self.model):
                    bad("model", self.model, "layer sizes must be whole numbers")
                if not isinstance(self.model, (list, tuple)):
                    bad("model", self.model, "layer sizes, a built-in name or file.py:function "
                                             "(pass a Python callable as Trainer(cfg, model=...))")
                self.model = [int(d) for d in self.model]
                if len(self.model) < 2 or any(d < 1 for d in self.model):
                    bad("model", self.model, "at least two positive layer sizes")
        if self.loss is not None:
            if not isinstance(self.loss, str):
                bad("loss", self.loss, "a built-in name or file.py:function (pass a Python callable as "
                                       "Trainer(cfg, loss=...))")
            check_reference(self.loss, "loss", BUILTIN_LOSS_NAMES)
        if self.seq_len < 1:
            bad("seq_len", self.seq_len, "must be >= 1")
        if not (isinstance(self.update_threads, (int, np.integer)) and 0 <= self.update_threads <= 64):
            bad("update_threads", self.update_threads, "a whole number of threads from 1 to 64, or 0 (auto)")
        if self.token_dtype not in ("uint16", "uint32"):
            bad("token_dtype", self.token_dtype, "expected uint16 or uint32")
        if self.vocab_size is not None and not (isinstance(self.vocab_size, (int, np.integer)) and self.vocab_size >= 1):
            bad("vocab_size", self.vocab_size, "must be a whole number >= 1")
        if self.features is not None and not [c for c in self.features.split(",") if c.strip()]:
            bad("features", self.features, "expected column names, comma-separated")
        if self.workers < 1:
            bad("workers", self.workers, "must be >= 1")
        if self.batch_size < 1:
            bad("batch_size", self.batch_size, "must be >= 1")
        if self.micro_batch is not None and not (isinstance(self.micro_batch, (int, np.integer))
                                                 and self.micro_batch >= 1):
            bad("micro_batch", self.micro_batch, "examples per forward and backward pass: a whole number >= 1")
        if self.steps is None and self.epochs < 1:
            bad("epochs", self.epochs, "must be >= 1")
        if self.steps is not None and self.steps < 1:
            bad("steps", self.steps, "must be >= 1")
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            bad("target_accuracy", self.target_accuracy, "must be in (0, 1]")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            bad("lr", self.lr, "the learning rate must be > 0")
        if not 0 <= self.momentum < 1:
            bad("momentum", self.momentum, "must be in [0, 1)")
        if self.weight_decay < 0:
            bad("weight_decay", self.weight_decay, "must be >= 0")
        if self.warmup < 0:
            bad("warmup", self.warmup, "must be >= 0")
        if self.betas is not None:
            self.betas = parse_betas(self.betas)
            if self.optimizer not in ADAM_OPTIMIZERS:
                bad("betas", ",".join(f"{b:g}" for b in self.betas), f"betas are Adam's and AdamW's, and the "
                                                                      f"optimizer is {self.optimizer}")
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
            bad("eps", self.eps, "must be > 0")
        if self.eps != ADAM_EPS and self.optimizer not in ADAM_OPTIMIZERS:
            bad("eps", self.eps, f"eps is Adam's and AdamW's, and the optimizer is {self.optimizer}")
        if self.clip_grad_norm is not None and not (isinstance(self.clip_grad_norm, (int, float))
                                                    and math.isfinite(self.clip_grad_norm) and self.clip_grad_norm > 0):
            bad("clip_grad_norm", self.clip_grad_norm, "a finite norm > 0 (leave it out for no clipping)")
        if not (isinstance(self.min_lr, (int, float)) and math.isfinite(self.min_lr) and 0 <= self.min_lr):
            bad("min_lr", self.min_lr, "must be >= 0")
        if self.min_lr and self.schedule != "cosine":
            bad("min_lr", self.min_lr, f"the cosine schedule's floor, and the schedule is {self.schedule}")
        if self.min_lr > self.lr:
            bad("min_lr", self.min_lr, f"above the learning rate {self.lr:g}: the cosine falls from lr to min_lr")
        if self.gpus_per_worker > 0 and self.device == "cpu":
            self.device = "cuda"
        for name in ("n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                bad(name, getattr(self, name), "must be >= 1")
        if self.n_embd % self.n_head:
            bad("n_head", self.n_head, f"must divide --n-embd {self.n_embd}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            bad("dropout", self.dropout, "a probability in [0, 1)")
        if self.log_every < 1:
            bad("log_every", self.log_every, "must be >= 1")
        if not (isinstance(self.mlflow_experiment, str) and self.mlflow_experiment.strip()):
            bad("mlflow_experiment", self.mlflow_experiment, "an experiment's name")
        if self.eval_batch_size < 1:
            bad("eval_batch_size", self.eval_batch_size, "must be >= 1")
        if self.eval_every is not None and self.eval_every < 1:
            bad("eval_every", self.eval_every, "must be >= 1 (leave it out to evaluate at epoch ends only)")
        if self.eval_batches is not None and self.eval_batches < 1:
            bad("eval_batches", self.eval_batches, "must be >= 1 (leave it out to evaluate whole splits)")
        if self.cpus is not None and self.cpus < 1:
            bad("cpus", self.cpus, "must be >= 1")
        if self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            bad("cpus_per_worker/gpus_per_worker", (self.cpus_per_worker, self.gpus_per_worker), "must be >= 0")
        if self.checkpoint_every < 0:
            bad("checkpoint_every", self.checkpoint_every, "must be >= 0")
        if self.keep_checkpoints < 1:
            bad("keep_checkpoints", self.keep_checkpoints, "must be >= 1")
        if self.max_failures < 0:
            bad("max_failures", self.max_failures, "must be >= 0")
        if not self.step_timeout > 0:
            bad("step_timeout", self.step_timeout, "must be > 0 seconds")
        if not (self.staleness == math.inf or (float(self.staleness).is_integer() and self.staleness >= 0)):
            bad("staleness", self.staleness, "a whole number of parameter versions >= 0, or inf")
        if not (isinstance(self.backup_workers, (int, np.integer)) and self.backup_workers >= 0):
            bad("backup_workers", self.backup_workers, "must be a whole number >= 0")
        if self.staleness and self.backup_workers:
            bad("backup_workers", self.backup_workers, "choose bounded staleness or backup workers, not both")
        if (self.staleness or self.backup_workers) and self.transport == "compiled_graph":
            bad("transport", self.transport, "a compiled graph runs only the synchronous step: use auto or "
                                             "object_store with staleness or backup workers")
        if self.batch_size < self.replicas:  # (checked once backup_workers is known good)
            who = f"{self.replicas} worker replicas" if self.backup_workers else f"{self.workers} workers"
            bad("batch_size", self.batch_size, f"smaller than the {who}: each needs an example")
        try:
            compress.parse(self.compress)
        except ValueError as e:
            raise ConfigError(f"invalid compress: {e}", field="compress") from None
        if not (isinstance(self.servers, (int, np.integer)) and self.servers >= 1):
            bad("servers", self.servers, "must be a whole number >= 1")
        if self.servers > 1:
            for name, value, why in (("transport", self.transport == "compiled_graph",
                                      "a compiled graph reaches one server: use auto or object_store"),
                                     ("staleness", self.staleness, "relaxed steps run on one server"),
                                     ("backup_workers", self.backup_workers, "relaxed steps run on one server")):
                if value:
                    bad(name, getattr(self, name), f"{why}; sharded servers (--servers {self.servers}) "
                                                   "take the synchronous step")
        if self.straggler is not None:
            who, factor = parse_straggler(self.straggler)
            if who != "random" and who >= self.replicas:
                bad("straggler", self.straggler, f"worker {who} of {self.replicas} (ranks 0 to {self.replicas - 1})")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                bad(f.name, getattr(self, f.name), _or(choices))

    @property
    def replicas(self) -> int:
        """Worker actors the run starts: `workers`, plus the backup workers."""
        return self.workers + self.backup_workers

    @property
    def relaxed(self) -> bool:
        """Whether steps run relaxed (bounded staleness or backup workers) instead of exactly synchronous."""
        return bool(self.staleness or self.backup_workers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}", field=unknown[0])
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


BUILTIN_MODEL_NAMES = ("mlp", "cnn1d", "cnn2d", "transformer", "gpt")
BUILTIN_LOSS_NAMES = ("cross_entropy", "mse")


def is_widths(spec) -> bool:
    """True for layer sizes: a list of whole numbers, or text like "40,256,256,10"."""
    if isinstance(spec, str):
        parts = spec.replace(" ", "").split(",")
        return bool(spec.strip()) and all(p.isdigit() for p in parts if p) and any(parts)
    if isinstance(spec, (list, tuple)):
        return all(isinstance(d, (int, np.integer)) or (isinstance(d, float) and d.is_integer()) for d in spec)
    return False


def check_reference(text: str, field: str, builtins: tuple) -> None:
    """A built-in name, or something of the form where:function (resolved when the run starts)."""
    where, sep, name = text.rpartition(":")
    if text in builtins or (sep and where and name.isidentifier()):
        return
    raise ConfigError(f"invalid {field}: {text!r} (expected {'layer sizes like 40,256,256,10, ' if field == 'model' else ''}"
                      f"a built-in name ({', '.join(builtins)}), path/to/file.py:function or "
                      "package.module:function)", field=field)


def parse_straggler(text: str) -> tuple:
    """"RANK:FACTOR" -> (rank, factor); "random:FACTOR" -> ("random", factor). FACTOR >= 1."""
    who, sep, factor = str(text).partition(":")
    try:
        f = float(factor)
        rank = "random" if who == "random" else int(who)
    except ValueError:
        f, rank = None, None
    if not sep or f is None or not math.isfinite(f) or f < 1 or (rank != "random" and rank < 0):
        raise ConfigError(f"invalid straggler: {text!r} (expected RANK:FACTOR or random:FACTOR, a rank >= 0 "
                          "and a factor >= 1, e.g. 1:3)", field="straggler")
    return rank, f


def parse_betas(value) -> list:
    """"0.9,0.99" or (0.9, 0.99) -> [0.9, 0.99]: two numbers in [0, 1) (ConfigError otherwise)."""
    parts = value.split(",") if isinstance(value, str) else value
    try:
        betas = [float(b) for b in parts]
    except (TypeError, ValueError):
        betas = []
    if len(betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"invalid betas: {value!r} (two numbers in [0, 1) as B1,B2, e.g. 0.9,0.99)", field="betas")
    return betas


def parse_model(text: str) -> list:
    """"40,256,256,10" -> [40, 256, 256, 10]."""
    try:
        dims = [int(p) for p in str(text).replace(" ", "").split(",") if p]
    except ValueError:
        raise ConfigError(f"invalid model: {text!r} (expected layer sizes like 40,256,256,10)",
                          field="model") from None
    return dims
