import importlib
import numpy as np
import pytest

import dptrain as dp
import dptrain.nn.functional as F


def test_parameters_have_one_stable_order():
    m = dp.nn.MLP([4, 8, 3], seed=0)
    names = [n for n, _ in m.named_parameters()]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert [p.shape for p in m.parameters()] == [(8, 4), (8,), (3, 8), (3,)]
    assert m.num_parameters() == 8 * 4 + 8 + 3 * 8 + 3


def test_same_seed_same_model():
    a, b = dp.nn.MLP([4, 8, 3], seed=7), dp.nn.MLP([4, 8, 3], seed=7)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        np.testing.assert_array_equal(pa, pb)


def test_linear_init_is_torch_like():
    lin = dp.nn.Linear(400, 300, rng=np.random.default_rng(0))
    bound = 1 / np.sqrt(400)
    assert np.abs(lin.weight.data).max() <= bound and np.abs(lin.bias.data).max() <= bound
    assert np.abs(lin.weight.data).max() > 0.95 * bound  # uniform over the whole range
    assert lin.weight.dtype == np.float32


def test_flat_buffer_views():
    m = dp.nn.MLP([3, 5, 2], seed=0)
    before = [p.data.copy() for p in m.parameters()]
    buf = m.flat()
    assert buf.data.ndim == 1 and buf.num_parameters == m.num_parameters() <= buf.size < m.num_parameters() + 64
    assert all(p.data.ctypes.data % 64 == 0 for p in m.parameters())  # aligned for BLAS
    for p, old in zip(m.parameters(), before):  # values kept, storage shared
        np.testing.assert_array_equal(p.data, old)
        assert np.shares_memory(p.data, buf.data) and np.shares_memory(p.grad, buf.grad)
    assert m.flat() is buf  # made once
    buf.data[...] = 0.5  # writing the flat array changes the parameters
    assert all((p.data == 0.5).all() for p in m.parameters())
    assert buf.data.flags["C_CONTIGUOUS"]


def test_backward_fills_the_flat_gradient():
    m = dp.nn.MLP([3, 5, 2], seed=0, dtype="float64")
    buf = m.flat()
    x, y = np.random.default_rng(0).standard_normal((4, 3)), np.array([0, 1, 1, 0])
    F.cross_entropy(m(dp.Tensor(x)), y).backward()
    assert np.abs(buf.grad).sum() > 0
    concat = np.concatenate([p.grad.ravel() for p in m.parameters()])
    for p, view in zip(m.parameters(), buf.views(buf.grad)):
        np.testing.assert_array_equal(p.grad, view)
    np.testing.assert_array_equal(np.abs(buf.grad).sum(), np.abs(concat).sum())  # the gaps stay zero
    # the same gradients as a model that never had a flat buffer
    ref = dp.nn.MLP([3, 5, 2], seed=0, dtype="float64")
    F.cross_entropy(ref(dp.Tensor(x)), y).backward()
    np.testing.assert_allclose(np.concatenate([p.grad.ravel() for p in ref.parameters()]), concat)
    m.zero_grad()
    assert not buf.grad.any() and np.shares_memory(m.parameters()[0].grad, buf.grad)


def test_state_dict_round_trip():
    a, b = dp.nn.MLP([3, 5, 2], seed=0), dp.nn.MLP([3, 5, 2], seed=1)
    buf = b.flat()
    b.load_state_dict(a.state_dict())
    for (_, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        np.testing.assert_array_equal(pa, pb)
    assert b.flat() is buf and np.shares_memory(b.parameters()[0].data, buf.data)
    sd = a.state_dict()
    sd["0.weight"] += 1  # the state dict is a copy
    assert not np.array_equal(sd["0.weight"], a.state_dict()["0.weight"])


def test_load_state_dict_checks_names_and_shapes():
    m = dp.nn.MLP([3, 5, 2], seed=0)
    sd = m.state_dict()
    with pytest.raises(KeyError, match="missing keys"):
        m.load_state_dict({k: v for k, v in sd.items() if k != "0.bias"})
    bad = dict(sd, **{"0.weight": np.zeros((5, 4))})
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(5, 4\)"):
        m.load_state_dict(bad)


def test_a_tied_parameter_is_one_parameter_under_two_names():
    """An output head tied to the token embedding: stored once (parameters, flat buffer, layout),
    its gradient the sum of both uses (finite differences, float64), listed under both names by
    state_dict as in PyTorch, and loaded from either name or both (which must agree)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from user_models import TiedCharModel
    m = TiedCharModel(7, 4).to("float64")
    assert [n for n, _ in m.named_parameters()] == ["wte.weight", "norm.weight"]
    assert m.flat().shapes == [(7, 4), (4,)] and m.flat().num_parameters == 7 * 4 + 4  # stored once
    assert list(m.state_dict()) == ["wte.weight", "norm.weight", "lm_head.weight"]
    x, y = np.array([[1, 2, 3], [4, 5, 6]]), np.array([[2, 3, 4], [5, 6, 0]])

    def loss():
        return float(F.cross_entropy(m(dp.Tensor(x)), y, reduction="sum").data)
    m.zero_grad()
    F.cross_entropy(m(dp.Tensor(x)), y, reduction="sum").backward()
    w, numeric = m.wte.weight.data, np.zeros((7, 4))
    for i in range(7):
        for j in range(4):
            w[i, j] += 1e-6
            up = loss()
            w[i, j] -= 2e-6
            numeric[i, j] = (up - loss()) / 2e-6
            w[i, j] += 1e-6
    np.testing.assert_allclose(m.wte.weight.grad, numeric, atol=1e-7)
    sd = {k: v + 1 for k, v in m.state_dict().items()}
    m.load_state_dict(sd)  # both names
    np.testing.assert_array_equal(m.lm_head.weight.data, sd["wte.weight"])
    m.load_state_dict({k: v for k, v in sd.items() if k != "wte.weight"})  # the alias alone
    with pytest.raises(ValueError, match="'wte.weight' and 'lm_head.weight' are one shared parameter but differ"):
        m.load_state_dict(dict(sd, **{"lm_head.weight": sd["wte.weight"] * 2}))
    with pytest.raises(KeyError, match=r"missing keys \['wte.weight'\]"):
        m.load_state_dict({"norm.weight": sd["norm.weight"]})


def test_sequential_and_custom_module():
    class Net(dp.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = dp.nn.Sequential(dp.nn.Linear(2, 4), dp.nn.Tanh())
            self.head = dp.nn.Linear(4, 1)

        def forward(self, x):
            return self.head(self.body(x))

    net = Net()
    assert [n for n, _ in net.named_parameters()] == ["body.0.weight", "body.0.bias", "head.weight", "head.bias"]
    out = net(dp.Tensor(np.ones((3, 2))))
    assert out.shape == (3, 1)
    with pytest.raises(ValueError, match="activation"):
        dp.nn.MLP([2, 2], activation="gelu")
    with pytest.raises(ValueError, match="dims"):
        dp.nn.MLP([2])


def test_a_lazy_zero_grad_gives_the_eager_ones_gradients_bit_for_bit():
    """FlatBuffer.zero_grad(lazy=True), as a worker's step calls it, writes no zeros: each
    gradient's first write overwrites it, an embedding's scatter-add zero-fills its own first, and
    settle() zeroes what no backward wrote. Over stale values, with a tied weight, a parameter
    the forward never uses and two backward passes that accumulate, the gradients are eager
    zero_grad's to the bit."""
    from dptrain.models import GPT

    class WithUnused(dp.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = dp.nn.Linear(4, 3), dp.nn.Linear(3, 3)

        def forward(self, x):
            return self.used(x)

    rng = np.random.default_rng(0)
    cases = [(GPT(11, 6, n_layer=1, n_head=2, n_embd=8), rng.integers(0, 11, (3, 6)), rng.integers(0, 11, (3, 6))),
             (WithUnused(), rng.standard_normal((5, 4)), rng.integers(0, 3, 5))]
    for model, x, y in cases:
        flat = model.flat()
        results = []
        for lazy in (False, True):
            flat.grad[...] = np.float32(7.0)  # stale values: a step before left its gradient here
            flat.zero_grad(lazy=lazy)
            for part in (slice(0, 2), slice(2, None)):  # two micro-batches: the second accumulates
                out = model(dp.Tensor(x[part]))
                F.cross_entropy(out.reshape(-1, out.shape[-1]), y[part].reshape(-1), reduction="sum").backward()
            flat.settle()
            results.append(flat.grad.copy())
        assert not np.all(results[0] == 0)
        assert np.array_equal(results[0].view(np.uint32 if results[0].itemsize == 4 else np.uint64),
                              results[1].view(np.uint32 if results[1].itemsize == 4 else np.uint64))


def test_direct_gradient_writes_match_accumulation(monkeypatch):
    """Backward writes a zeroed parameter's gradient in place; the numbers equal plain `+=`."""
    tensor_module = importlib.import_module("dptrain.tensor")
    x, y = np.random.default_rng(1).standard_normal((6, 3)), np.array([0, 1, 1, 0, 1, 0])

    def grads(direct, twice):
        monkeypatch.setattr(tensor_module, "DIRECT_GRAD_WRITES", direct)
        m = dp.nn.MLP([3, 5, 2], seed=0, dtype="float64")
        m.flat().grad[...] = 7.0  # stale values that zero_grad must clear
        m.zero_grad()
        for _ in range(2 if twice else 1):  # a second backward accumulates
            F.cross_entropy(m(dp.Tensor(x)), y).backward()
        h = m[0](dp.Tensor(x))  # the first layer used twice in one graph
        F.cross_entropy(m[2](m[1](h)) + m[2](m[1](h)), y).backward()
        return m.flat().grad.copy()

    for twice in (False, True):
        np.testing.assert_allclose(grads(True, twice), grads(False, twice), rtol=1e-12)
