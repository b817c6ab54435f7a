"""Data larger than memory: arrays that stay in their files, read a batch at a time.

Two kinds of file are opened this way (`--data`):

- a folder of `.npy` files named like a `.npz`'s arrays: `x.npy` and `y.npy`, optionally
  `x_test.npy` and `y_test.npy` (without them the last 20% of the rows is held out);
- a token stream, a `.bin` file of uint16 (or `--token-dtype uint32`) token ids as nanoGPT's
  `prepare.py` writes them: example i is the window of `--seq-len` tokens starting at token i,
  labelled by the window one token later. `val.bin` beside a `train.bin` is the held-out split
  (nanoGPT's layout), else the last 10% of the stream; held-out windows start every `seq_len`
  tokens (each token scored once). The vocabulary is `--vocab-size`, or nanoGPT's `meta.pkl`
  beside the file, or the largest id + 1.

An array here (`FileArray`, `TokenWindows`) pickles as its file's path, offset and shape, so
Ray ships a few hundred bytes to each worker, which opens the file itself. Rows are read with
`os.preadv` straight into the batch's buffer: a worker's memory holds its batch and nothing of
the file (a memory map would count every page the run has touched in the worker's own memory;
the page cache still keeps the hot parts, shared by every process of the node). Checks that
need the whole file (finite values, labels, token ids in the vocabulary) scan it in chunks
of CHUNK_BYTES, once, on the driver, and once per file: a later run on the same unchanged file
takes the result from ~/.cache/dptrain (`scanned`).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np

CHUNK_BYTES = 64 << 20  # a whole-file check reads this much at a time
SCANS_KEPT = 256  # files whose scan results are remembered (scanned)
SAMPLE_BLOCKS, SAMPLE_BYTES = 16, 4096  # a file's fingerprint: its size and this many blocks' hash


class _InPlace:
    """What the two kinds of array read in place share: numpy's `shape`, `dtype`, `ndim`, `nbytes`,
    `len` and `astype`, and indexing by an int, a slice or an integer array (negative ones
    counted from the end), which reads those rows into a new numpy array (`_read_rows`)."""

    mapped = True
    shape: tuple
    dtype: np.dtype

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def astype(self, dtype, copy: bool = True) -> np.ndarray:
        return self[:].astype(dtype, copy=False)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self._read_between(start, max(start, stop))
            key = np.arange(start, stop, step)
        if np.ndim(key) == 0:
            return self[np.asarray([key])][0]
        index = np.asarray(key).astype(np.int64, copy=False).reshape(-1)
        n = len(self)
        if index.size and (index.min() < -n or index.max() >= n):
            raise IndexError(f"{self._where()}: row index out of range for {n} rows")
        out = np.empty((len(index),) + self.shape[1:], self.dtype)
        self._read_rows(np.where(index < 0, index + n, index), out)
        return out

    def _read_between(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop)."""
        return self[np.arange(start, stop)]


class FileArray(_InPlace):
    """A read-only C-ordered array of `shape` and `dtype` at byte `offset` of `path`."""

    def __init__(self, path: str, dtype, shape: tuple, offset: int = 0):
        self.path, self.dtype, self.shape, self.offset = str(path), np.dtype(dtype), tuple(int(d) for d in shape), int(offset)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._fd = None

    def __reduce__(self):  # the path, not the data: the receiving process opens the file itself
        return (FileArray, (self.path, self.dtype.str, self.shape, self.offset))

    def _where(self) -> str:
        return self.path

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def _read_between(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop): one read."""
        out = np.empty((stop - start,) + self.shape[1:], self.dtype)
        self.read_into(out, self.offset + start * self.row_bytes)
        return out

    def _read_rows(self, index: np.ndarray, out: np.ndarray) -> None:
        for k, i in enumerate(index.tolist()):  # a row is contiguous: one read each
            self.read_into(out[k:k + 1], self.offset + i * self.row_bytes)  # a view, also of a 1-D array

    def read_into(self, out: np.ndarray, at: int) -> None:
        """Fill `out` with the file's bytes from byte `at` on."""
        if not out.size:
            return
        view, fd, done = memoryview(out.reshape(-1).view(np.uint8)), self._file(), 0
        while done < len(view):  # large reads may come back in parts
            got = os.preadv(fd, [view[done:]], at + done)
            if got <= 0:
                raise OSError(f"{self.path}: short read at byte {at + done} (the file changed during the run?)")
            done += got

    def chunks(self):
        """The whole array, CHUNK_BYTES at a time (for checks that see every value)."""
        per = max(1, CHUNK_BYTES // max(self.row_bytes, 1))
        for start in range(0, self.shape[0], per):
            yield self._read_between(start, min(self.shape[0], start + per))


class TokenWindows(_InPlace):
    """Row i is tokens[first + i * stride + shift : ... + length] of a 1-D FileArray of token ids:
    the inputs (shift 0) or the labels (shift 1) of next-token prediction."""

    def __init__(self, tokens: FileArray, first: int, count: int, length: int, stride: int = 1, shift: int = 0):
        self.tokens, self.first, self.count, self.length = tokens, int(first), int(count), int(length)
        self.stride, self.shift = int(stride), int(shift)
        self.shape, self.dtype = (self.count, self.length), tokens.dtype

    def __reduce__(self):
        return (TokenWindows, (self.tokens, self.first, self.count, self.length, self.stride, self.shift))

    def _where(self) -> str:
        return self.tokens.path

    def _read_rows(self, index: np.ndarray, out: np.ndarray) -> None:
        starts = self.first + index * self.stride + self.shift
        for k, s in enumerate(starts.tolist()):  # each window is contiguous: one read
            self.tokens.read_into(out[k], self.tokens.offset + s * self.dtype.itemsize)


def is_mapped(a) -> bool:
    """Whether `a` stays in its file (FileArray, TokenWindows) rather than in memory."""
    return getattr(a, "mapped", False) is True


def files_of(a) -> list:
    """The files a dataset array reads."""
    if isinstance(a, TokenWindows):
        return [a.tokens.path]
    return [a.path] if isinstance(a, FileArray) else []


def fingerprint(path: str) -> tuple[int, str] | None:
    """(size, a hash of SAMPLE_BLOCKS blocks spread over the file) of `path`; None if it cannot be
    read. Two nodes that give the same answer read the same data (a copy that differs, or a
    mount that is stale, is caught without reading the whole file on every node)."""
    try:
        size = os.path.getsize(path)
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for j in range(SAMPLE_BLOCKS):
                f.seek(max(0, (size - SAMPLE_BYTES) * j // max(SAMPLE_BLOCKS - 1, 1)))
                h.update(f.read(SAMPLE_BYTES))
        return size, h.hexdigest()
    except OSError:
        return None


def dataset_files(dataset) -> list:
    """The files a dataset reads in place (sorted), none for one in memory."""
    return sorted({f for a in (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test) for f in files_of(a)})


def in_place(dataset):
    """`dataset` (read in place) with the fingerprints of its files as they were checked: what
    every node must read (check_nodes)."""
    dataset.files = fingerprints(dataset_files(dataset))
    return dataset


def fingerprints(files: list) -> dict:
    """path -> fingerprint (or None) of each of `files`, on the node this runs on."""
    return {f: fingerprint(f) for f in files}


def check_nodes(dataset, timeout: float = 120.0) -> None:
    """Every live node of the Ray cluster reads the same files as the driver (size and sampled
    content), or DataError naming the first node that does not: its workers would train on other
    data, or fail at their first batch. A zero-CPU task on each node; nothing for in-memory data."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    mine = dataset.files or {}
    files = sorted(mine)
    if not files:
        return
    task = ray.remote(num_cpus=0, max_retries=0)(fingerprints)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(files)
            for n in nodes]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    for node, ref in zip(nodes, refs):
        where = f"node {node.get('NodeManagerAddress')} ({node['NodeID'][:12]})"
        if ref not in ready:
            raise _error()(f"{files[0]}: {where} did not answer the data check within {timeout:g} s")
        theirs = ray.get(ref)
        for f in files:
            if theirs[f] is None:
                raise _error()(f"{f}: {where} cannot read this file; every node that runs workers must see it "
                               "at the same path (a shared filesystem, or a copy)")
            if theirs[f] != mine[f]:
                raise _error()(f"{f}: {where} holds another file at this path than the one checked here "
                               f"({theirs[f][0]} bytes there, {mine[f][0]} here"
                               f"{', other content' if theirs[f][0] == mine[f][0] else ''})")


# ---------------------------------------------------------------------------- opening files

def _error():  # datasets.DataError, imported late (datasets imports this module)
    from .datasets import DataError
    return DataError


def open_npy(path) -> FileArray:
    """An .npy file as a FileArray (its header read, nothing else)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset = f.tell()
    except FileNotFoundError:
        raise _error()(f"data file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise _error()(f"{path}: not a readable .npy file ({e})") from None
    if dtype.hasobject or dtype.kind not in "fiub":
        raise _error()(f"{path}: dtype {dtype}; numbers expected")
    if fortran and len(shape) > 1:
        raise _error()(f"{path}: stored in Fortran order; save it C-ordered (np.save(path, np.ascontiguousarray(a)))")
    if len(shape) == 0:
        raise _error()(f"{path}: a scalar, not an array of examples")
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if os.path.getsize(path) < need:
        raise _error()(f"{path}: the file is shorter than its header says ({os.path.getsize(path)} bytes, {need} expected)")
    return FileArray(str(path.resolve()), dtype, shape, offset)


def _check_values(a: FileArray, what: str, labels: bool, classification: bool) -> int:
    """Scan `a` once: finite values (floats), whole non-negative labels for classification; the
    largest label (classification) or -1."""
    top = -1
    seen = 0
    for chunk in a.chunks():
        if chunk.dtype.kind == "f":
            bad = ~np.isfinite(chunk)
            if bad.any():
                row = seen + int(np.argwhere(bad.reshape(len(chunk), -1))[0][0])
                raise _error()(f"{what} contains NaN or Inf (first at row {row})")
        if labels and classification:
            if chunk.dtype.kind == "f" and np.any(chunk != np.round(chunk)):
                raise _error()(f"{what}: class labels must be whole numbers")
            if chunk.size and chunk.min() < 0:
                raise _error()(f"{what}: class labels must be >= 0, found {int(chunk.min())}")
            if chunk.size:
                top = max(top, int(chunk.max()))
        seen += len(chunk)
    return top


def _all_whole(a: FileArray) -> bool:
    return all(np.isfinite(c).all() and np.all(c == np.round(c)) for c in a.chunks())


def load_npy_folder(folder, task: str | None = None, test_fraction: float = 0.2):
    """A folder of x.npy and y.npy (optionally x_test.npy and y_test.npy), read in place."""
    from .datasets import Dataset
    folder = Path(folder)
    names = ("x", "y", "x_test", "y_test")
    found = {k: folder / f"{k}.npy" for k in names if (folder / f"{k}.npy").is_file()}
    missing = [f"{k}.npy" for k in ("x", "y") if k not in found]
    if missing:
        raise _error()(f"{folder}: missing {missing}; a data folder holds x.npy and y.npy (and optionally x_test.npy "
                       f"and y_test.npy), or Parquet or CSV files")
    if ("x_test" in found) != ("y_test" in found):
        raise _error()(f"{folder}: x_test.npy and y_test.npy must come together")
    arrays = {k: open_npy(p) for k, p in found.items()}
    x, y = arrays["x"], arrays["y"]
    if len(x) != len(y):
        raise _error()(f"{folder}: x.npy has {len(x)} rows but y.npy has {len(y)}")
    if x.ndim == 1:
        x = arrays["x"] = FileArray(x.path, x.dtype, (len(x), 1), x.offset)
    if "x_test" in arrays:
        xt, yt = arrays["x_test"], arrays["y_test"]
        if xt.ndim == 1:
            xt = FileArray(xt.path, xt.dtype, (len(xt), 1), xt.offset)
        if len(xt) != len(yt):
            raise _error()(f"{folder}: x_test.npy has {len(xt)} rows but y_test.npy has {len(yt)}")
    else:  # the last rows are held out (a shuffled split would read the whole file into memory)
        n_test = max(1, int(round(len(x) * test_fraction)))
        if len(x) - n_test < 1:
            raise _error()(f"{folder}: {len(x)} rows is too few to hold out {test_fraction:.0%} of them")
        cut = len(x) - n_test
        xt = FileArray(x.path, x.dtype, (n_test,) + x.shape[1:], x.offset + cut * x.row_bytes)
        yt = FileArray(y.path, y.dtype, (n_test,) + y.shape[1:], y.offset + cut * y.row_bytes)
        x = FileArray(x.path, x.dtype, (cut,) + x.shape[1:], x.offset)
        y = FileArray(y.path, y.dtype, (cut,) + y.shape[1:], y.offset)
    task = task or ("classification" if y.dtype.kind in "iub" or (y.ndim == 1 and scanned(y, "whole", lambda: _all_whole(y)))
                    else "regression")  # as for a .npz's labels
    classification = task == "classification"
    if not classification and y.ndim == 1:
        y, yt = (FileArray(a.path, a.dtype, (len(a), 1), a.offset) for a in (y, yt))
    tops = []
    for what, a, labels in ((f"{folder}/x.npy", x, False), (f"{folder}/y.npy", y, True),
                            (f"{folder}/x_test.npy" if "x_test" in found else f"{folder}/x.npy (held out)", xt, False),
                            (f"{folder}/y_test.npy" if "y_test" in found else f"{folder}/y.npy (held out)", yt, True)):
        tops.append(scanned(a, f"values-{labels}-{classification}",
                            lambda a=a, what=what, labels=labels: _check_values(a, what, labels, classification)))
    return in_place(Dataset(str(folder), x, y, xt, yt, task,
                            num_classes=max(tops) + 1 if classification else None).validate())


TOKEN_DTYPES = ("uint16", "uint32")


def read_meta(folder: Path) -> dict:
    """nanoGPT's meta.pkl (vocab_size, itos) beside a token file, read without running code: only
    dicts, lists, strings and numbers are accepted."""
    path = folder / "meta.pkl"
    if not path.is_file():
        return {}

    class Plain(pickle.Unpickler):
        def find_class(self, module, name):
            raise _error()(f"{path}: holds a {module}.{name} object; only plain values are read (vocab_size, itos)")
    try:
        with open(path, "rb") as f:
            meta = Plain(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        if isinstance(e, _error()):
            raise
        raise _error()(f"{path}: not a readable meta.pkl ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("vocab_size"), int):
        raise _error()(f"{path}: expected a dict with an integer vocab_size")
    return meta


def _tokens(path: Path, dtype: str) -> FileArray:
    if not path.is_file():
        raise _error()(f"data file not found: {path}")
    item = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size % item:
        raise _error()(f"{path}: {size} bytes is not a whole number of {dtype} token ids ({item} bytes each); "
                       f"--token-dtype {'uint32' if dtype == 'uint16' else 'uint16'}?")
    return FileArray(str(path.resolve()), dtype, (size // item,))


def scanned(a: FileArray, kind: str, scan):
    """`scan()`'s result for the array `a` (a number), from a cache of earlier runs' scans when the
    file is unchanged (its path, size, modification time and inode): a second run on a file of
    tens of GB starts without reading it again. The cache is `scans.json` in ~/.cache/dptrain (or
    $DPTRAIN_CACHE); one that cannot be read or written is ignored."""
    from .datasets import _cache_dir
    st = os.stat(a.path)
    key = f"{a.path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{a.dtype.str}|{a.offset}|{a.shape}|{kind}"
    path = _cache_dir() / "scans.json"
    try:
        cache = json.loads(path.read_text())
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    value = scan()
    cache[key] = value
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".scans.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dict(list(cache.items())[-SCANS_KEPT:])))
        os.replace(tmp, path)
    except OSError:
        pass
    return value


def _largest_token(tokens: FileArray, vocab: int | None, where: str) -> int:
    """The largest id of a token stream; DataError naming the first id outside `vocab` (and its
    position) if there is one. One pass over the file, or none when an earlier run scanned it."""
    top = scanned(tokens, "largest", lambda: _scan_tokens(tokens, None, where))
    if vocab is not None and top >= vocab:
        _scan_tokens(tokens, vocab, where)  # finds and names it
    return top


def _scan_tokens(tokens: FileArray, vocab: int | None, where: str) -> int:
    top, seen = -1, 0
    for chunk in tokens.chunks():
        if chunk.size:
            m = int(chunk.max())
            if vocab is not None and m >= vocab:
                at = seen + int(np.argmax(chunk >= vocab))
                raise _error()(f"{tokens.path}: token id {int(chunk[at - seen])} at position {at} is outside the "
                               f"vocabulary of {vocab} ({where})")
            top = max(top, m)
        seen += len(chunk)
    return top


def load_tokens(path, seq_len: int, token_dtype: str = "uint16", vocab_size: int | None = None,
                test_fraction: float = 0.1):
    """A .bin token stream (see the module's docstring) as next-token prediction windows."""
    from .datasets import Dataset
    if token_dtype not in TOKEN_DTYPES:
        raise _error()(f"token dtype {token_dtype!r}: expected one of {TOKEN_DTYPES}")
    path = Path(path)
    tokens = _tokens(path, token_dtype)
    held = path.with_name("val.bin") if path.name == "train.bin" else None
    held_tokens = _tokens(held, token_dtype) if held is not None and held.is_file() else None
    meta = read_meta(path.parent)
    vocab, where = (vocab_size, "--vocab-size") if vocab_size is not None else \
        (meta.get("vocab_size"), f"{path.parent / 'meta.pkl'}")
    if vocab is not None and vocab > np.iinfo(token_dtype).max + 1:
        raise _error()(f"{path}: a vocabulary of {vocab} does not fit {token_dtype} token ids")
    top = max(_largest_token(t, vocab, where) for t in (tokens, held_tokens) if t is not None)
    need = seq_len + 1
    if held_tokens is None:
        split = int(len(tokens) * (1 - test_fraction))
        train, test = (tokens, 0, split), (tokens, split, len(tokens) - split)
    else:
        train, test = (tokens, 0, len(tokens)), (held_tokens, 0, len(held_tokens))
    for name, (_, _, n) in (("training part", train), ("held-out part", test)):
        if n < need:
            raise _error()(f"{path}: the {name} has {n} tokens, too few for --seq-len {seq_len} ({need} needed)")

    def windows(part, stride):
        t, first, n = part
        count = (n - need) // stride + 1
        return (TokenWindows(t, first, count, seq_len, stride, 0), TokenWindows(t, first, count, seq_len, stride, 1))
    x, y = windows(train, 1)
    x_test, y_test = windows(test, seq_len)
    itos = meta.get("itos")
    vocab_chars = None
    if vocab_size is None and isinstance(itos, dict) and all(isinstance(itos.get(i), str) and len(itos[i]) == 1
                                                             for i in range(meta["vocab_size"])):
        vocab_chars = "".join(itos[i] for i in range(meta["vocab_size"]))  # character-level: `dptrain sample` decodes
    return in_place(Dataset(str(path), x, y, x_test, y_test, "classification",
                            num_classes=vocab if vocab is not None else top + 1, vocab=vocab_chars).validate())
