"""Datasets: the built-in ones, and user files (.npz, .csv, .txt).

Every loader returns a `Dataset` with a training and a held-out split, checked
for the mistakes that otherwise surface as a NaN loss ten minutes into a run.
"""

from __future__ import annotations

import csv
import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .mapped import is_mapped

TASKS = ("classification", "regression")


class DataError(ValueError):
    """The data cannot be used: the message says which file, key or value and why."""


@dataclass
class Dataset:
    """Train and test arrays. `x` is (n, ...) of any shape: (n, features), images (n, channels,
    height, width), token sequences (n, positions). `y` holds int64 class labels of shape (n,)
    or (n, positions) (one label per position: next-token prediction), or float targets of
    shape (n, k). `num_classes` fixes the class count when the labels may not show them all
    (a vocabulary)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    task: str
    num_classes: int | None = None
    vocab: str | None = None  # the characters of a text dataset, by token id
    files: dict | None = None  # read in place (mapped.py): path -> its fingerprint when it was checked

    @property
    def input_shape(self) -> tuple:
        """The shape of one example's input: (features,), (channels, height, width), (positions,)."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def num_features(self) -> int:
        return int(np.prod(self.input_shape))

    @property
    def num_outputs(self) -> int:
        """Classes for classification, target columns for regression."""
        if self.task == "classification":
            if self.num_classes is not None:
                return self.num_classes
            return int(max(self.y_train.max(), self.y_test.max() if len(self.y_test) else 0)) + 1
        return int(self.y_train.shape[1])

    def __len__(self) -> int:
        return len(self.x_train)

    def validate(self, source: str | None = None) -> "Dataset":
        where = source or self.name
        if self.task not in TASKS:
            raise DataError(f"{where}: unknown task {self.task!r}; expected one of {TASKS}")
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.ndim < 2:
                raise DataError(f"{where}: {split} inputs must be (examples, ...), got shape {x.shape}")
            if len(x) != len(y):
                raise DataError(f"{where}: {split} has {len(x)} feature rows but {len(y)} labels")
            if x.dtype.kind not in "fiub":
                raise DataError(f"{where}: {split} features have dtype {x.dtype}; numbers expected")
            if is_mapped(x) or is_mapped(y):
                continue  # its values were checked as its file was opened, a chunk at a time (mapped.py)
            bad = ~np.isfinite(x)
            if bad.any():
                row = int(np.argwhere(bad)[0][0])
                raise DataError(f"{where}: {split} features contain NaN or Inf (first at row {row})")
            if y.dtype.kind == "f" and not np.isfinite(y).all():
                row = int(np.argwhere(~np.isfinite(y.reshape(len(y), -1)))[0][0])
                raise DataError(f"{where}: {split} labels contain NaN or Inf (first at row {row})")
        if len(self.x_train) == 0:
            raise DataError(f"{where}: the training split is empty")
        if self.x_test.shape[1:] != self.x_train.shape[1:]:
            raise DataError(f"{where}: train inputs are {self.x_train.shape[1:]} each, test inputs "
                            f"{self.x_test.shape[1:]}")
        if self.task == "classification":
            for split, y in (("train", self.y_train), ("test", self.y_test)):
                if y.shape[1:] != self.y_train.shape[1:]:
                    raise DataError(f"{where}: train labels are {self.y_train.shape[1:]} each, {split} labels "
                                    f"{y.shape[1:]}")
                if is_mapped(y):
                    continue
                if y.size and (y.min() < 0):
                    raise DataError(f"{where}: {split} class labels must be >= 0, found {int(y.min())}")
                if y.size and self.num_classes is not None and y.max() >= self.num_classes:
                    raise DataError(f"{where}: {split} class label {int(y.max())} is outside the "
                                    f"{self.num_classes} classes")
        elif self.y_train.ndim != 2 or self.y_test.ndim != 2 or self.y_test.shape[1] != self.y_train.shape[1]:
            raise DataError(f"{where}: regression targets must be (examples, outputs), got "
                            f"{self.y_train.shape} and {self.y_test.shape}")
        return self


def _finish(name, x_train, y_train, x_test, y_test, task, **extra) -> Dataset:
    """Cast to the canonical dtypes (float64 inputs, int64 labels or float64 (n, k) targets).

    Token ids are inputs too: float64 holds them exactly, and `Embedding` takes whole floats."""
    def labels(y):
        y = np.asarray(y)
        if task == "classification":
            if y.dtype.kind == "f":
                if not np.isfinite(y).all() or np.any(y != np.round(y)):
                    raise DataError(f"{name}: class labels must be whole numbers, got {y[:5]}...")
            return y.astype(np.int64)
        y = y.astype(np.float64)
        return y.reshape(len(y), -1)
    ds = Dataset(name, np.asarray(x_train, dtype=np.float64), labels(y_train),
                 np.asarray(x_test, dtype=np.float64), labels(y_test), task, **extra)
    return ds.validate()


def holdout_split(x, y, test_fraction: float = 0.2, seed: int = 0):
    """A seeded shuffle split: (x_train, y_train, x_test, y_test)."""
    if not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = max(1, int(round(len(x) * test_fraction)))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


# --------------------------------------------------------------------------- built-ins

def regression(n_train: int = 1000, n_test: int = 500, noise: float = 0.1, seed: int = 0) -> Dataset:
    """y = sin(2 x0) + x1 * x2 + noise for x uniform in [-2, 2]^3.

    The noise has standard deviation `noise`, so a perfect model's mean squared
    error on the test split is about noise**2 (0.01 by default); predicting the
    mean scores the target variance, about 1.4.
    """
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2, 2, (n_train + n_test, 3))
    y = np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2] + noise * rng.standard_normal(len(x))
    return _finish("regression", x[:n_train], y[:n_train], x[n_train:], y[n_train:], "regression")


def moons(n_train: int = 1000, n_test: int = 500, noise: float = 0.1, seed: int = 0) -> Dataset:
    """Two interleaving half circles (as scikit-learn's make_moons), labels 0 and 1."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    label = rng.integers(0, 2, n)
    t = rng.uniform(0, np.pi, n)
    x = np.where(label[:, None] == 0,
                 np.stack([np.cos(t), np.sin(t)], 1),
                 np.stack([1 - np.cos(t), 0.5 - np.sin(t)], 1))
    x = x + noise * rng.standard_normal((n, 2))
    return _finish("moons", x[:n_train], label[:n_train], x[n_train:], label[n_train:], "classification")


def spirals(n_train: int = 1500, n_test: int = 600, classes: int = 3, noise: float = 0.2,
            seed: int = 0) -> Dataset:
    """`classes` interleaved spiral arms in 2-D (the CS231n toy problem)."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    label = rng.integers(0, classes, n)
    r = rng.uniform(0, 1, n)
    theta = label * (2 * np.pi / classes) + 4 * r + noise * rng.standard_normal(n)
    x = np.stack([r * np.sin(theta), r * np.cos(theta)], 1)
    return _finish("spirals", x[:n_train], label[:n_train], x[n_train:], label[n_train:], "classification")


def synthetic(n_train: int = 8192, n_test: int = 2048, features: int = 784, classes: int = 10,
              seed: int = 0) -> Dataset:
    """Gaussian features labelled by a random linear teacher (argmax of x @ W).

    MNIST-sized by default (784 features, 10 classes): for throughput and scaling
    runs with large models, where the data's content does not matter, and still a
    learnable task.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_train + n_test, features))
    teacher = rng.standard_normal((features, classes))
    y = (x @ teacher).argmax(axis=1)
    return _finish("synthetic", x[:n_train], y[:n_train], x[n_train:], y[n_train:], "classification")


def _cache_dir() -> Path:
    root = os.environ.get("DPTRAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dptrain")
    return Path(root)


def mnist1d() -> Dataset:
    """MNIST-1D (Greydanus, 2020): 4,000 train / 1,000 test, 40 features, 10 classes.

    Generated locally by the `mnist1d` package with its standard settings (no
    download). Generation takes a few seconds, so the arrays are cached in
    ~/.cache/dptrain (or $DPTRAIN_CACHE), keyed by the package's version.
    """
    # keyed by the package's version, whose standard settings fix the data: a cached copy loads
    # without importing mnist1d (a second: it imports scipy)
    try:
        version = importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError:
        raise DataError("dataset 'mnist1d' needs the mnist1d package: pip install 'dptrain[datasets]'") from None
    path = _cache_dir() / f"mnist1d-{version}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
            return _finish("mnist1d", arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"], "classification")
        except Exception:
            pass  # a damaged cache file is simply regenerated
    from mnist1d.data import get_dataset_args, make_dataset
    args = get_dataset_args()
    d = make_dataset(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, x=d["x"], y=d["y"], x_test=d["x_test"], y_test=d["y_test"])
    os.replace(tmp, path)  # atomic: concurrent processes never read half a file
    return _finish("mnist1d", d["x"], d["y"], d["x_test"], d["y_test"], "classification")


def digits(seed: int = 0, image: bool = False) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images scaled to [0, 1]), 20% held out: 64
    features each, or with `image` one-channel images of shape (1, 8, 8) (dataset "digits2d")."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("dataset 'digits' needs scikit-learn: pip install 'dptrain[datasets]'") from None
    d = load_digits()
    x = d.data / 16.0
    if image:
        x = x.reshape(-1, 1, 8, 8)
    return _finish("digits2d" if image else "digits", *holdout_split(x, d.target, 0.2, seed), "classification")


def digits2d(seed: int = 0) -> Dataset:
    """The 8x8 digits as (1, 8, 8) images, for convolutional models (`--model cnn2d`)."""
    return digits(seed, image=True)


SORT_LENGTH, SORT_VALUES = 8, 10


def sort_task(n_train: int = 8000, n_test: int = 1000, length: int = SORT_LENGTH, values: int = SORT_VALUES,
              seed: int = 0) -> Dataset:
    """A generated sequence task: `length` random digits, a separator, the same digits sorted.

    Token ids 0..values-1 are digits, `values` is the separator. Each example is the
    sequence minus its last token, labelled by the sequence shifted by one (next-token
    prediction at every position): inputs and labels of shape (2 * length,). The first
    length - 1 labels are random digits (unpredictable: log(values) nats each); the
    separator and the sorted half follow from what came before, so a model that has
    learnt to sort scores (length - 1) / (2 length) * log(values) per token, 1.01 nats
    for the defaults, against about 2.3 for the best unigram model.
    """
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    digits_ = rng.integers(0, values, (n, length))
    seq = np.concatenate([digits_, np.full((n, 1), values), np.sort(digits_, axis=1)], axis=1)
    x, y = seq[:, :-1], seq[:, 1:]
    return _finish("sort", x[:n_train], y[:n_train], x[n_train:], y[n_train:], "classification",
                   num_classes=values + 1)


BUILTIN = {"regression": regression, "moons": moons, "spirals": spirals, "mnist1d": mnist1d, "digits": digits,
           "digits2d": digits2d, "synthetic": synthetic, "sort": sort_task}


# --------------------------------------------------------------------------- user files

def _infer_task(y: np.ndarray) -> str:
    if y.dtype.kind in "iub":
        return "classification"
    if y.ndim == 1 and y.dtype.kind == "f" and np.isfinite(y).all() and np.all(y == np.round(y)):
        return "classification"
    return "regression"


def load_npz(path, task: str | None = None, seed: int = 0) -> Dataset:
    """Arrays `x` and `y` (and optionally `x_test`, `y_test`; else 20% is held out)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:
        raise DataError(f"{path}: not a readable .npz file ({e})") from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(f"{path}: missing array(s) {missing}; found {sorted(arrays)} (expected x and y)")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path}: x_test and y_test must come together; found {sorted(arrays)}")
    x, y = arrays["x"], arrays["y"]
    if x.ndim == 1:  # one feature per example; any other shape (n, ...) is kept as it is
        x = x[:, None]
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} rows but y has {len(y)}")
    for k in ("x", "y", "x_test", "y_test"):
        if k in arrays and arrays[k].dtype.kind not in "fiub":
            raise DataError(f"{path}: array {k!r} has dtype {arrays[k].dtype}; numbers expected")
    task = task or _infer_task(y)
    if "x_test" in arrays:
        xt = arrays["x_test"]
        parts = (x, y, xt[:, None] if xt.ndim == 1 else xt, arrays["y_test"])
    else:
        _check_finite(x, y, path)
        parts = holdout_split(x, y, 0.2, seed)
    return _finish(str(path), *parts, task)


def _check_finite(x, y, path, names=("x", "y")):
    """DataError naming the first row of `x` or `y` (called `names`) with a NaN or Inf."""
    for name, a in zip(names, (x, y)):
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            row = int(np.argwhere(~np.isfinite(a.reshape(len(a), -1)))[0][0])
            raise DataError(f"{path}: {name} contains NaN or Inf (first at row {row})")


def load_csv(path, label: str | None = None, task: str | None = None, seed: int = 0) -> Dataset:
    """A CSV file with a header row; the label column is `label`, or the last one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if len(rows) < 2:
        raise DataError(f"{path}: needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    col = len(header) - 1 if label is None else (header.index(label) if label in header else None)
    if col is None:
        raise DataError(f"{path}: no label column named {label!r}; columns are {header}")
    values = np.empty((len(rows) - 1, len(header)))
    for i, r in enumerate(rows[1:], start=2):
        if len(r) != len(header):
            raise DataError(f"{path}: line {i} has {len(r)} fields, the header has {len(header)}")
        for j, c in enumerate(r):
            try:
                values[i - 2, j] = float(c)
            except ValueError:
                raise DataError(f"{path}: line {i}, column {header[j]!r}: {c!r} is not a number") from None
    x = np.delete(values, col, axis=1)
    y = values[:, col]
    _check_finite(x, y, path)
    return _finish(str(path), *holdout_split(x, y, 0.2, seed), task or _infer_task(y))


def load_text(path, seq_len: int = 64, test_fraction: float = 0.1) -> Dataset:
    """Character-level next-token prediction on a text file.

    The characters of the whole file are the vocabulary (token ids in sorted order).
    The last `test_fraction` of the text is held out. Examples are windows of seq_len + 1
    characters: the first seq_len are the input, the last seq_len the labels (every
    position predicts the next character). Training windows start every seq_len // 4
    characters, held-out windows every seq_len (each held-out character scored once).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if seq_len < 1:
        raise DataError(f"{path}: the sequence length must be >= 1, got {seq_len}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    vocab = "".join(sorted(set(text)))
    split = int(len(text) * (1 - test_fraction))
    need = seq_len + 1
    if split < need or len(text) - split < need:
        raise DataError(f"{path}: {len(text)} characters is too short for --seq-len {seq_len}: the training part "
                        f"({split}) and the held-out tail ({len(text) - split}) need {need} each")
    ids = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    lookup = {ord(c): i for i, c in enumerate(vocab)}
    tokens = np.array([lookup[c] for c in ids.tolist()], dtype=np.int64)

    def windows(part, stride):
        starts = np.arange(0, len(part) - need + 1, stride)
        w = part[starts[:, None] + np.arange(need)]
        return w[:, :-1], w[:, 1:]
    x, y = windows(tokens[:split], max(1, seq_len // 4))
    x_test, y_test = windows(tokens[split:], seq_len)
    return _finish(str(path), x, y, x_test, y_test, "classification", num_classes=len(vocab), vocab=vocab)


DATA_KINDS = ".npz, .csv, .txt, .bin (tokens), .parquet, a folder of x.npy and y.npy, of Parquet or of CSV files, or a glob"


def load_dataset(name: str | None = None, path: str | None = None, seed: int = 0, label: str | None = None,
                 features: str | None = None, seq_len: int = 64, token_dtype: str = "uint16",
                 vocab_size: int | None = None, **options) -> Dataset:
    """A built-in dataset by name (`options`: its generator's), or user data by path (`DATA_KINDS`):
    read whole into memory, or (.bin, .npy folders) read in place a batch at a time (mapped.py)."""
    from . import mapped, tables
    if path is not None:
        p = Path(path)
        suffix = p.suffix.lower()
        if tables.is_table_source(path):  # Parquet files, folders or globs; folders of CSV files
            return tables.load_files(path, label=label, features=features, seed=seed)
        if p.is_dir():
            return mapped.load_npy_folder(p)
        if suffix == ".npz":
            return load_npz(path, seed=seed)
        if suffix == ".csv":
            return load_csv(path, label=label, seed=seed)
        if suffix == ".txt":
            return load_text(path, seq_len=seq_len)
        if suffix == ".bin":
            return mapped.load_tokens(path, seq_len, token_dtype, vocab_size)
        if suffix:
            raise DataError(f"data file {path}: unsupported type {suffix!r}; expected {DATA_KINDS}")
        raise DataError(f"data file not found: {path}")
    if name not in BUILTIN:
        raise DataError(f"unknown dataset {name!r}; built-in datasets are {sorted(BUILTIN)}, "
                        f"or pass data by path ({DATA_KINDS})")
    return BUILTIN[name](**options)
