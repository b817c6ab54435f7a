import numpy as np
import pytest

from dptrain.data import BatchSampler, DataError, load_csv, load_dataset, load_npz, shard_bounds


@pytest.mark.parametrize("name,features,task", [("regression", 3, "regression"), ("moons", 2, "classification"),
                                                ("spirals", 2, "classification"), ("digits", 64, "classification"),
                                                ("mnist1d", 40, "classification")])
def test_builtin_datasets(name, features, task):
    ds = load_dataset(name)
    assert ds.num_features == features and ds.task == task
    assert len(ds.x_test) > 0 and np.isfinite(ds.x_train).all()
    if name == "mnist1d":
        assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40) and ds.num_outputs == 10
    if name == "digits":
        assert len(ds.x_train) + len(ds.x_test) == 1797 and ds.num_outputs == 10


def test_builtin_datasets_are_deterministic():
    a, b = load_dataset("spirals"), load_dataset("spirals")
    np.testing.assert_array_equal(a.x_train, b.x_train)


def test_unknown_dataset():
    with pytest.raises(DataError, match=r"unknown dataset 'mnist2d'"):
        load_dataset("mnist2d")


def test_npz(tmp_path, rng):
    path = tmp_path / "d.npz"
    x, y = rng.standard_normal((50, 3)), rng.integers(0, 4, 50)
    np.savez(path, x=x, y=y)
    ds = load_npz(path)
    assert ds.task == "classification" and len(ds.x_train) == 40 and len(ds.x_test) == 10
    np.savez(path, x=x, y=rng.standard_normal(50), x_test=x[:5], y_test=rng.standard_normal(5))
    ds = load_npz(path)
    assert ds.task == "regression" and ds.y_train.shape == (50, 1) and len(ds.x_test) == 5


@pytest.mark.parametrize("arrays,message", [
    ({"x": np.ones((4, 2))}, r"missing array\(s\) \['y'\]"),
    ({"x": np.ones((4, 2)), "y": np.ones(3)}, "x has 4 rows but y has 3"),
    ({"x": np.array([[1.0, np.nan]] * 4), "y": np.zeros(4)}, "NaN or Inf"),
    ({"x": np.array([[1.0, np.inf]] * 4), "y": np.zeros(4)}, "NaN or Inf"),
    ({"x": np.array([["a", "b"]] * 4), "y": np.zeros(4)}, "dtype"),
    ({"x": np.ones((4, 2)), "y": np.zeros(4), "x_test": np.ones((2, 2))}, "must come together"),
])
def test_npz_errors(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message):
        load_npz(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="data file not found: .*nope.npz"):
        load_dataset(path=str(tmp_path / "nope.npz"))
    with pytest.raises(DataError, match="unsupported type '.json'"):
        load_dataset(path=str(tmp_path / "d.json"))
    with pytest.raises(DataError, match="data file not found: .*d.txt"):
        load_dataset(path=str(tmp_path / "d.txt"))


def test_npz_keeps_input_shapes(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "images.npz"
    np.savez(path, x=rng.random((30, 3, 5, 5)), y=rng.integers(0, 4, 30))
    ds = load_npz(path)
    assert ds.x_train.shape[1:] == ds.input_shape == (3, 5, 5) and ds.num_features == 75
    assert ds.x_test.shape[1:] == (3, 5, 5)


def test_digits_as_images():
    from dptrain.data import digits2d
    ds = digits2d()
    assert ds.input_shape == (1, 8, 8) and ds.num_outputs == 10
    np.testing.assert_array_equal(ds.x_train.reshape(len(ds), 64), load_dataset("digits").x_train)


def test_sort_task_labels_are_the_next_tokens():
    ds = load_dataset("sort")
    assert ds.input_shape == (16,) and ds.y_train.shape[1:] == (16,) and ds.num_outputs == 11
    x, y = ds.x_train[0].astype(int), ds.y_train[0]
    np.testing.assert_array_equal(x[1:], y[:-1])  # shifted by one
    assert y[7] == 10 and list(y[8:]) == sorted(x[:8])  # the separator, then the digits sorted


def test_text_file_next_character(tmp_path):
    path = tmp_path / "t.txt"
    text = "hello world, " * 40 + "the held-out tail!"
    path.write_text(text)
    ds = load_dataset(path=str(path), seq_len=8)
    assert ds.vocab == "".join(sorted(set(text))) and ds.num_outputs == len(ds.vocab)
    decode = lambda ids: "".join(ds.vocab[int(i)] for i in ids)  # noqa: E731
    assert decode(ds.x_train[0]) == text[:8] and decode(ds.y_train[0]) == text[1:9]
    assert decode(ds.x_train[1]) == text[2:10]  # training windows every seq_len // 4
    tail = text[int(len(text) * 0.9):]
    assert decode(ds.x_test[0]) == tail[:8] and decode(ds.y_test[0]) == tail[1:9]
    with pytest.raises(DataError, match="too short for --seq-len 200"):
        load_dataset(path=str(path), seq_len=200)


def test_csv(tmp_path):
    path = tmp_path / "d.csv"
    rows = ["a,b,label,c"] + [f"{i},{i * 2},{i % 3},{-i}" for i in range(20)]
    path.write_text("\n".join(rows) + "\n")
    ds = load_csv(path, label="label")
    assert ds.num_features == 3 and ds.task == "classification" and ds.num_outputs == 3
    with pytest.raises(DataError, match="class labels must be >= 0"):
        load_csv(path)  # the last column, c, holds negative whole numbers: not class labels
    with pytest.raises(DataError, match="no label column named 'y'"):
        load_csv(path, label="y")


def test_csv_errors(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b\n1,2\n3,oops\n")
    with pytest.raises(DataError, match=r"line 3, column 'b': 'oops' is not a number"):
        load_csv(path)
    path.write_text("a,b\n1,2\n3\n")
    with pytest.raises(DataError, match="line 3 has 1 fields"):
        load_csv(path)
    path.write_text("a,b\n1.5,nan\n2.5,1\n")
    with pytest.raises(DataError, match="NaN or Inf"):
        load_csv(path)


def test_shards_are_contiguous_and_balanced():
    for batch in (1, 7, 256, 255):
        for n in (1, 2, 3, 4):
            bounds = [shard_bounds(batch, n, r) for r in range(n)]
            assert bounds[0][0] == 0 and bounds[-1][1] == batch
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1


def test_sampler_epochs_and_determinism():
    s = BatchSampler(10, 4, seed=3)
    assert s.steps_per_epoch == 3
    epoch0 = np.concatenate([s.indices(i) for i in range(3)])
    assert sorted(epoch0) == list(range(10)) and len(s.indices(2)) == 2
    epoch1 = np.concatenate([s.indices(i) for i in range(3, 6)])
    assert sorted(epoch1) == list(range(10)) and not np.array_equal(epoch0, epoch1)
    t = BatchSampler(10, 4, seed=3)
    np.testing.assert_array_equal(t.indices(4), s.indices(4))  # any process, same answer
    shards = [s.shard(4, 3, r) for r in range(3)]
    np.testing.assert_array_equal(np.concatenate(shards), s.indices(4))
    assert not np.array_equal(BatchSampler(10, 4, seed=4).indices(0), s.indices(0))
