"""Tables in: Parquet and CSV files, and Ray Datasets, as a `Dataset`.

`--data` takes a Parquet file, a folder of Parquet files (or of CSV files), or a glob of
them. The files are read with pyarrow (the reader under Ray Data) on the driver, before Ray
starts, so bad input is one line and exit 2 with nothing started, and `train_local` reads
them without Ray. Their order is fixed once: files sorted by path, rows in file order; so
index i is the same example for every worker, every replay and every resume. A
`ray.data.Dataset` given to `Trainer(cfg, dataset=...)` (or a dict of them with "train" and
"test") is read through Ray Data with `preserve_order` on, for the same reason.

Columns: the label is `--label` (default: the last column); the inputs are `--features`
(default: every other column). Numeric columns are one input each; a column of fixed-shape
numeric arrays (lists of equal length, nested lists, Arrow's or Ray Data's tensor columns) is
an input of that shape when it is the only input column, and its values flattened beside the
others' otherwise. Without a "test" split, 20% of the rows (a seeded choice, as for .csv) is
held out.

What is materialized where: the whole table becomes numpy arrays on the driver (its memory:
the arrays in the training dtype), put once into Ray's object store, where each node that
runs workers holds one copy that its workers read without copying (trainer.py). For data
larger than memory use a token stream or .npy files, read in place (mapped.py).
"""

from __future__ import annotations

import glob as globlib
from pathlib import Path

import numpy as np

from .datasets import DataError, Dataset, _check_finite, _finish, _infer_task, holdout_split

TABLE_SUFFIXES = (".parquet", ".pq")
GLOB_CHARS = "*?["
COLUMNS = ("an input column", "the label column")  # what a NaN is named in


def is_table_source(path: str) -> bool:
    """Whether `--data` names Parquet data (a file, a glob, a folder of them) or a folder of CSV files."""
    p = Path(path)
    if any(c in str(path) for c in GLOB_CHARS) and not p.exists():
        return True
    if p.suffix.lower() in TABLE_SUFFIXES:
        return True
    return p.is_dir() and not (p / "x.npy").exists() and bool(_files_in(p))


def _files_in(folder: Path) -> list:
    for suffixes in (TABLE_SUFFIXES, (".csv",)):
        files = sorted(str(f) for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in suffixes)
        if files:
            return files
    return []


def table_files(path: str) -> list:
    """The files `path` names, sorted: the order of the rows."""
    p = Path(path)
    if p.is_dir():
        files = _files_in(p)
        if not files:
            raise DataError(f"{path}: the folder holds no .parquet or .csv files")
        return files
    if p.is_file():
        return [str(p)]
    if any(c in str(path) for c in GLOB_CHARS):
        files = sorted(f for f in globlib.glob(str(path), recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"{path}: no file matches the pattern")
        return files
    raise DataError(f"data file not found: {path}")


def read_files(path: str):
    """One pyarrow Table of every file `path` names, in order."""
    try:
        import pyarrow as pa
    except ImportError:
        raise DataError(f"{path}: reading Parquet or CSV tables needs pyarrow: pip install 'dptrain[data]'") from None
    files = table_files(path)
    kinds = {Path(f).suffix.lower() in TABLE_SUFFIXES for f in files}
    if len(kinds) > 1:
        raise DataError(f"{path}: mixes Parquet and CSV files; give one kind")
    tables = []
    for f in files:
        try:
            if Path(f).suffix.lower() in TABLE_SUFFIXES:
                import pyarrow.parquet as pq
                tables.append(pq.read_table(f))
            else:
                import pyarrow.csv as pcsv
                tables.append(pcsv.read_csv(f))
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{f}: not a readable {'Parquet' if Path(f).suffix.lower() in TABLE_SUFFIXES else 'CSV'} "
                            f"file ({str(e).splitlines()[0]})") from None
    schema = tables[0].schema
    for f, t in zip(files[1:], tables[1:]):
        if t.schema.names != schema.names:
            raise DataError(f"{f}: columns {t.schema.names} differ from {files[0]}'s {schema.names}")
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowException as e:
        raise DataError(f"{path}: the files' column types do not agree ({str(e).splitlines()[0]})") from None


def column_array(table, name: str, where: str) -> np.ndarray:
    """A numeric column as an (n, ...) array: scalars (n,), fixed-shape arrays (n, *shape)."""
    import pyarrow as pa
    col = table.column(name)
    if col.null_count:
        raise DataError(f"{where}: column {name!r} has {col.null_count} missing values")
    col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    tensor = isinstance(col.type, pa.ExtensionType)  # Arrow's or Ray Data's tensors: lists of values, and a shape
    if tensor and getattr(col.type, "shape", None) is None:
        raise DataError(f"{where}: column {name!r} has type {col.type}; numbers or arrays of numbers expected")
    values, shape = _unnested(col.storage if tensor else col, name, where)
    if tensor:
        shape = [int(d) for d in col.type.shape]
    return _numeric(values, name, where, col.type).reshape([len(col)] + shape)


def _unnested(values, name: str, where: str) -> tuple:
    """(the innermost values, the shape of one row) of a column of lists of lists ... of one shape;
    ([], the column) for a column of scalars. DataError for a ragged or incomplete column."""
    import pyarrow as pa
    import pyarrow.compute as pc
    shape = []
    while pa.types.is_list(values.type) or pa.types.is_large_list(values.type) or pa.types.is_fixed_size_list(values.type):
        lengths = np.asarray(pc.list_value_length(values).fill_null(-1))
        if len(lengths) and (lengths.min() != lengths.max()):
            first = int(np.argmax(lengths != lengths[0]))
            raise DataError(f"{where}: column {name!r} is ragged: {int(lengths[0])} values in one row, "
                            f"{int(lengths[first])} in another; arrays of one shape expected")
        if values.null_count or (len(lengths) and lengths.min() < 0):
            raise DataError(f"{where}: column {name!r} has missing values")
        shape.append(int(lengths[0]) if len(lengths) else 0)
        values = values.flatten()
    return values, shape


def _numeric(values, name, where, typ) -> np.ndarray:
    import pyarrow as pa
    t = values.type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        raise DataError(f"{where}: column {name!r} has type {typ}; numbers or arrays of numbers expected")
    if values.null_count:
        raise DataError(f"{where}: column {name!r} has missing values")
    return np.asarray(values.to_numpy(zero_copy_only=False))


def from_table(table, where: str, label: str | None = None, features: str | None = None) -> tuple:
    """(x, y) of a table: the label column and the input columns (module docstring)."""
    names = list(table.schema.names)
    if len(names) < 2 and features is None:
        raise DataError(f"{where}: needs an input and a label column; found {names}")
    label = names[-1] if label is None else label
    if label not in names:
        raise DataError(f"{where}: no label column named {label!r}; columns are {names}")
    inputs = [c.strip() for c in features.split(",") if c.strip()] if features else [n for n in names if n != label]
    missing = [c for c in inputs if c not in names]
    if missing:
        raise DataError(f"{where}: no column named {missing[0]!r} (--features); columns are {names}")
    if label in inputs:
        raise DataError(f"{where}: column {label!r} is the label and an input (--features)")
    parts = [column_array(table, c, where) for c in inputs]
    if len(parts) == 1 and parts[0].ndim > 1:
        x = parts[0]  # one array column: inputs of its shape (an image, a sequence)
    else:
        x = np.concatenate([p.reshape(len(p), -1) for p in parts], axis=1)
    return x, column_array(table, label, where)


def load_files(path: str, label: str | None = None, features: str | None = None, seed: int = 0) -> Dataset:
    """Parquet or CSV files (`--data`): read in order, columns chosen, 20% held out."""
    x, y = from_table(read_files(path), path, label, features)
    _check_finite(x, y, path, COLUMNS)
    return _finish(str(path), *holdout_split(x, y, 0.2, seed), _infer_task(y))


# ---------------------------------------------------------------------------- Ray Data

def is_ray_dataset(data) -> bool:
    """Whether `data` is a ray.data.Dataset, or a dict of them by split ("train", "test")."""
    try:
        from ray.data import Dataset as RayDataset
    except ImportError:
        return False
    if isinstance(data, dict):
        return bool(data) and all(isinstance(v, RayDataset) for v in data.values())
    return isinstance(data, RayDataset)


def from_ray(data, label: str | None = None, features: str | None = None, seed: int = 0) -> Dataset:
    """A ray.data.Dataset (or {"train": ..., "test": ...}) read in its order into a Dataset."""
    import pyarrow as pa
    splits = data if isinstance(data, dict) else {"train": data}
    unknown = sorted(set(splits) - {"train", "test"})
    if unknown or "train" not in splits:
        raise DataError(f"Ray Datasets by split: expected keys 'train' and optionally 'test', got {sorted(splits)}")
    arrays = {}
    for split, ds in splits.items():
        where = f"the Ray Dataset ({split})"
        options = ds.context.execution_options  # the dataset's own: taken from the global one when it was made
        was, options.preserve_order = options.preserve_order, True
        try:
            batches = list(ds.iter_batches(batch_format="pyarrow", batch_size=None))
        finally:
            options.preserve_order = was
        if not batches or sum(len(b) for b in batches) == 0:
            raise DataError(f"{where}: holds no rows")
        arrays[split] = from_table(pa.concat_tables(batches, promote_options="permissive"), where, label, features)
        _check_finite(*arrays[split], where, COLUMNS)
    x, y = arrays["train"]
    parts = (x, y, *arrays["test"]) if "test" in arrays else holdout_split(x, y, 0.2, seed)
    return _finish("ray.data.Dataset", *parts, _infer_task(y))
