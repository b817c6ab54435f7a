"""User data beyond one file in memory: token streams and .npy folders read in place (larger than
memory), Parquet and CSV tables, Ray Datasets. Each gives the parameters of the same data given
in memory, N workers give one process's, and bad input is one line naming the problem."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import dptrain as dp
from dptrain.data import DataError, load_dataset, tables
from dptrain.data.datasets import _finish, holdout_split

ROOT = Path(__file__).resolve().parent.parent
GPT = dict(model="gpt", n_layer=1, n_head=2, n_embd=16, seq_len=16, batch_size=16, steps=6, dtype="float64",
           eval_batches=2, eval_every=3)
MLP = dict(model=[6, 8, 3], batch_size=32, steps=8, dtype="float64", lr=0.1)


def _max_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def _windows(tokens: np.ndarray, seq_len: int, stride: int):
    w = np.lib.stride_tricks.sliding_window_view(tokens.astype(np.int64), seq_len + 1)[::stride]
    return w[:, :-1], w[:, 1:]


@pytest.fixture
def token_stream(tmp_path):
    """nanoGPT's layout: train.bin, val.bin and meta.pkl (uint16 ids, a character vocabulary)."""
    tokens = np.random.default_rng(0).integers(0, 20, 3000).astype(np.uint16)
    tokens[:2400].tofile(tmp_path / "train.bin")
    tokens[2400:].tofile(tmp_path / "val.bin")
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 20, "itos": {i: chr(97 + i) for i in range(20)},
                     "stoi": {chr(97 + i): i for i in range(20)}}, f)
    memory = _finish("memory", *_windows(tokens[:2400], 16, 1), *_windows(tokens[2400:], 16, 16), "classification",
                     num_classes=20)
    return tmp_path / "train.bin", memory


@pytest.fixture
def npy_folder(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((500, 6)).astype(np.float32)
    y = (x[:, :3].argmax(1)).astype(np.int64)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    return tmp_path, _finish("memory", x[:400], y[:400], x[400:], y[400:], "classification")


@pytest.fixture
def parquet_folder(tmp_path):
    """Three Parquet files of (2, 3)-shaped array rows (nested lists) and a label column."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(2)
    x = rng.standard_normal((450, 2, 3))
    y = x[:, 0].argmax(1)
    for i in range(3):  # written out of order: the rows' order is the sorted paths'
        part = slice(i * 150, (i + 1) * 150)
        pq.write_table(pa.table({"image": x[part].tolist(), "noise": rng.standard_normal(150), "label": y[part]}),
                       tmp_path / f"part-{i}.parquet")
    return tmp_path, _finish("memory", *holdout_split(x.reshape(450, 6), y, 0.2, 0), "classification")


def test_a_token_stream_is_read_in_place_and_trains_as_in_memory(token_stream):
    """Windows at every position of train.bin, val.bin held out, meta.pkl's vocabulary; what
    travels to a worker is the file's name, not its data; the parameters of the same windows in memory."""
    path, memory = token_stream
    ds = load_dataset(path=str(path), seq_len=16)
    assert ds.x_train.shape == memory.x_train.shape == (2384, 16) and ds.x_test.shape == memory.x_test.shape
    assert ds.num_outputs == 20 and ds.vocab == "abcdefghijklmnopqrst"
    np.testing.assert_array_equal(ds.x_train[np.array([7, 0, 2383])], memory.x_train[[7, 0, 2383]])
    np.testing.assert_array_equal(ds.y_test[3:9], memory.y_test[3:9])
    assert len(pickle.dumps(ds)) < 4096  # a worker opens the file itself
    cfg = dp.TrainConfig(data=str(path), **GPT)
    assert _max_diff(dp.train_local(cfg).params, dp.train_local(cfg, dataset=memory).params) == 0.0


def test_a_second_run_on_an_unchanged_file_does_not_scan_it_again(token_stream, tmp_path, monkeypatch):
    """The driver's whole-file check (token ids, values) is remembered by the file's path, size,
    modification time and inode: a tens-of-GB stream is read once, not at every start; a file that
    changed is scanned again, and an id outside a vocabulary given later is still found."""
    from dptrain.data import mapped
    monkeypatch.setenv("DPTRAIN_CACHE", str(tmp_path / "cache"))
    path, _ = token_stream
    load_dataset(path=str(path), seq_len=16)

    def no_reading(self):
        raise AssertionError(f"{self.path} read again")
    with monkeypatch.context() as m:
        m.setattr(mapped.FileArray, "chunks", no_reading)
        assert load_dataset(path=str(path), seq_len=16).num_outputs == 20
        with pytest.raises(AssertionError, match="read again"):  # --vocab-size 10: the first id above is named
            load_dataset(path=str(path), seq_len=16, vocab_size=10)
    with pytest.raises(DataError, match=r"train.bin: token id 1\d at position \d+ is outside the vocabulary of 10"):
        load_dataset(path=str(path), seq_len=16, vocab_size=10)
    tokens = np.fromfile(path, np.uint16)
    np.append(tokens, np.uint16(3)).tofile(path)  # changed: another size, another time
    with monkeypatch.context() as m:
        m.setattr(mapped.FileArray, "chunks", no_reading)
        with pytest.raises(AssertionError, match="read again"):
            load_dataset(path=str(path), seq_len=16)


def test_an_npy_folder_is_read_in_place_and_trains_as_in_memory(npy_folder):
    folder, memory = npy_folder
    ds = load_dataset(path=str(folder))
    assert ds.x_train.shape == (400, 6) and ds.x_test.shape == (100, 6) and ds.num_outputs == 3
    assert ds.x_train.dtype == np.float32 and len(pickle.dumps(ds)) < 4096
    cfg = dp.TrainConfig(data=str(folder), **MLP)
    assert _max_diff(dp.train_local(cfg).params, dp.train_local(cfg, dataset=memory).params) == 0.0


def test_parquet_files_give_the_table_in_memory(parquet_folder):
    """A folder, or a glob, of Parquet files in path order; --features picks the array column,
    whose rows keep their (2, 3) shape; the same split as the arrays in memory."""
    folder, memory = parquet_folder
    ds = load_dataset(path=str(folder / "part-*.parquet"), label="label", features="image")
    assert ds.x_train.shape == (360, 2, 3) and ds.task == "classification" and ds.num_outputs == 3
    np.testing.assert_array_equal(ds.x_train.reshape(360, 6), memory.x_train)
    both = load_dataset(path=str(folder), label="label")  # every other column: flattened side by side
    assert both.x_train.shape == (360, 7)
    cfg = dp.TrainConfig(data=str(folder), label="label", features="image", model=[6, 8, 3],
                         **{k: v for k, v in MLP.items() if k != "model"})
    flat = dp.train_local(cfg.replace(model="mlp"), dataset=memory)
    assert _max_diff(dp.train_local(cfg.replace(model="mlp"), dataset=_flat(ds)).params, flat.params) == 0.0


def _flat(ds):
    return _finish("flat", ds.x_train.reshape(len(ds.x_train), -1), ds.y_train,
                   ds.x_test.reshape(len(ds.x_test), -1), ds.y_test, ds.task)


@pytest.mark.ray
@pytest.mark.parametrize("source,workers", [("tokens", 4), ("npy", 3), ("parquet", 2), ("ray_data", 3)])
def test_n_workers_on_data_in_files_equal_one_process(ray_local, source, workers, token_stream, npy_folder,
                                                      parquet_folder):
    """Each worker reads its own examples (from the file, for data read in place; from the one
    object-store copy of the table otherwise): N workers give one process's parameters."""
    data = None
    if source == "tokens":
        cfg = dp.TrainConfig(data=str(token_stream[0]), **GPT)
    elif source == "npy":
        cfg = dp.TrainConfig(data=str(npy_folder[0]), **MLP)
    elif source == "parquet":
        cfg = dp.TrainConfig(data=str(parquet_folder[0]), label="label", features="image", model="mlp",
                             **{k: v for k, v in MLP.items() if k != "model"})
    else:  # Ray Data reading the Parquet files, a Dataset per split, in their order: the same rows in memory
        import ray.data
        folder = parquet_folder[0]
        data = {"train": ray.data.read_parquet([str(folder / "part-0.parquet"), str(folder / "part-1.parquet")]),
                "test": ray.data.read_parquet(str(folder / "part-2.parquet"))}
        table = tables.read_files(str(folder))
        x, y = tables.column_array(table, "image", "t"), tables.column_array(table, "label", "t")
        cfg = dp.TrainConfig(label="label", features="image", model="mlp", **{k: v for k, v in MLP.items() if k != "model"})
        one = dp.train_local(cfg, dataset=_finish("memory", x[:300], y[:300], x[300:], y[300:], "classification"))
    if data is None:
        one = dp.train_local(cfg)
    result = dp.Trainer(cfg.replace(workers=workers), dataset=data).fit()
    assert result.summary["steps"] == cfg.steps
    assert _max_diff(result.params, one.params) < 1e-10


@pytest.mark.ray
def test_every_node_must_read_the_file_the_driver_checked(ray_local, token_stream):
    """The driver's fingerprint of a file read in place (its size and sampled blocks) is compared
    with each node's: a file changed or gone there is named, with the node, before any worker starts."""
    from dptrain.data.mapped import check_nodes
    path, _ = token_stream
    ds = load_dataset(path=str(path), seq_len=16)
    check_nodes(ds)  # every node (this one) reads what was checked
    tokens = np.fromfile(path, np.uint16)
    tokens[::-1].tofile(path)  # same size, other content
    with pytest.raises(DataError, match=r"train.bin: node [\d.]+ \(\w+\) holds another file at this path than "
                                        r"the one checked here \(4800 bytes there, 4800 here, other content\)"):
        check_nodes(ds)
    tokens.tofile(path)
    check_nodes(ds)  # the checked file is back
    os.remove(path.with_name("val.bin"))
    with pytest.raises(DataError, match=r"val.bin: node [\d.]+ \(\w+\) cannot read this file; every node that "
                                        r"runs workers must see it at the same path"):
        check_nodes(ds)


def _bin(tmp_path, values, dtype=np.uint16, name="tokens.bin"):
    np.asarray(values, dtype).tofile(tmp_path / name)
    return str(tmp_path / name)


def _parquet(tmp_path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table(columns), tmp_path / "t.parquet")
    return str(tmp_path / "t.parquet")


@pytest.mark.parametrize("case,message", [
    ("odd_size", r"tokens.bin: 201 bytes is not a whole number of uint16 token ids \(2 bytes each\); "
                 r"--token-dtype uint32\?"),
    ("vocab", r"tokens.bin: token id 30 at position 50 is outside the vocabulary of 20 \(--vocab-size\)"),
    ("meta", r"train.bin: token id 20 at position 7 is outside the vocabulary of 20 \(.*meta.pkl\)"),
    ("meta_code", r"meta.pkl: holds a posix.system object; only plain values are read"),
    ("short", r"tokens.bin: the held-out part has 10 tokens, too few for --seq-len 16 \(17 needed\)"),
    ("missing_column", r"t.parquet: no column named 'pixels' \(--features\); columns are \['a', 'b', 'label'\]"),
    ("missing_label", r"t.parquet: no label column named 'class'; columns are \['a', 'b', 'label'\]"),
    ("text_column", r"t.parquet: column 'b' has type string; numbers or arrays of numbers expected"),
    ("ragged", r"t.parquet: column 'a' is ragged: 2 values in one row, 3 in another"),
    ("nulls", r"t.parquet: column 'a' has 1 missing values"),
    ("npy_missing", r"missing \['y.npy'\]; a data folder holds x.npy and y.npy"),
    ("npy_nan", r"x.npy contains NaN or Inf \(first at row 3\)"),
    ("glob", r"nothing-\*.parquet: no file matches the pattern"),
])
def test_bad_data_is_named(tmp_path, case, message):
    kwargs = {}
    if case == "odd_size":
        path = _bin(tmp_path, np.zeros(201, np.uint8), np.uint8)
    elif case == "vocab":
        path, kwargs = _bin(tmp_path, [1] * 50 + [30] + [2] * 200), {"vocab_size": 20}
    elif case in ("meta", "meta_code"):
        path = _bin(tmp_path, [1] * 7 + [20] + [2] * 200, name="train.bin")
        with open(tmp_path / "meta.pkl", "wb") as f:
            if case == "meta":
                pickle.dump({"vocab_size": 20}, f)
            else:
                pickle.dump({"vocab_size": 20, "hook": os.system}, f)
    elif case == "short":
        path = _bin(tmp_path, [1] * 100)
    elif case in ("missing_column", "missing_label", "text_column"):
        path = _parquet(tmp_path, {"a": [1.0, 2.0], "b": ["x", "y"], "label": [0, 1]})
        kwargs = {"missing_column": {"features": "a,pixels"}, "missing_label": {"label": "class"},
                  "text_column": {}}[case]
    elif case == "ragged":
        path = _parquet(tmp_path, {"a": [[1.0, 2.0], [1.0, 2.0, 3.0]], "label": [0, 1]})
    elif case == "nulls":
        path = _parquet(tmp_path, {"a": [1.0, None, 3.0], "label": [0, 1, 0]})
    elif case == "npy_missing":
        np.save(tmp_path / "x.npy", np.zeros((10, 2)))
        path = str(tmp_path)
    elif case == "npy_nan":
        x = np.zeros((10, 2))
        x[3, 1] = np.nan
        np.save(tmp_path / "x.npy", x)
        np.save(tmp_path / "y.npy", np.zeros(10, np.int64))
        path = str(tmp_path)
    else:
        path = str(tmp_path / "nothing-*.parquet")
    with pytest.raises(DataError, match=message):
        load_dataset(path=path, seq_len=16, **kwargs)


def test_the_cli_refuses_bad_data_in_one_line_before_ray_starts(tmp_path):
    path = _bin(tmp_path, [1] * 50 + [30] + [2] * 200)
    r = subprocess.run([sys.executable, "-m", "dptrain.cli", "train", "--data", path, "--vocab-size", "20",
                        "--model", "gpt", "--seq-len", "16"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "token id 30 at position 50 is outside the vocabulary of 20" in lines[0], r.stderr


def test_an_epoch_of_a_huge_stream_is_a_permutation_computed_per_batch():
    """Beyond sampler.LARGE examples an epoch's order is a Feistel permutation evaluated per batch:
    every index once per epoch, in range, the same for every process, another order next epoch."""
    from dptrain.data.sampler import LARGE, BatchSampler, IndexPermutation
    for n in (1, 2, 3, 1000, 12345):
        assert np.array_equal(np.sort(IndexPermutation(n, [0, 1])[np.arange(n)]), np.arange(n)), n
    n = 10**10  # windows of a 20 GB stream: numpy's permutation would need 80 GB
    a, b = BatchSampler(n, 256, seed=3), BatchSampler(n, 256, seed=3)
    first = a.indices(0)
    assert np.array_equal(first, b.indices(0)) and len(np.unique(first)) == 256
    assert first.min() >= 0 and first.max() < n
    assert not np.array_equal(first, a.indices(a.steps_per_epoch))  # the next epoch's first batch
    small = BatchSampler(1000, 100, seed=3)  # below LARGE: numpy's permutation, as before
    assert LARGE > 1000 and np.array_equal(small.indices(0), np.random.default_rng([3, 0]).permutation(1000)[:100])
