import gc
import weakref

import numpy as np
import pytest

import dptrain as dp
import dptrain.nn.functional as F
from gradcheck import check_op

# (name, function of tensors, input shapes, options) -- one line per op, broadcasting included
OPS = [
    ("add", lambda a, b: a + b, [(3, 4), (3, 4)], {}),
    ("add_broadcast_row", lambda a, b: a + b, [(3, 4), (4,)], {}),
    ("add_broadcast_col", lambda a, b: a + b, [(3, 1), (1, 4)], {}),
    ("add_scalar", lambda a: 2.5 + a, [(3,)], {}),
    ("sub", lambda a, b: a - b, [(2, 3), (2, 3)], {}),
    ("sub_broadcast", lambda a, b: a - b, [(2, 3, 4), (3, 1)], {}),
    ("rsub", lambda a: 1.0 - a, [(4,)], {}),
    ("mul", lambda a, b: a * b, [(3, 4), (3, 4)], {}),
    ("mul_broadcast", lambda a, b: a * b, [(2, 3, 4), (4,)], {}),
    ("div", lambda a, b: a / b, [(3, 4), (3, 4)], {"positive": True}),
    ("div_broadcast", lambda a, b: a / b, [(3, 4), (3, 1)], {"positive": True}),
    ("rdiv", lambda a: 2.0 / a, [(5,)], {"positive": True}),
    ("neg", lambda a: -a, [(3, 2)], {}),
    ("pow2", lambda a: a ** 2, [(3, 4)], {}),
    ("pow_frac", lambda a: a ** 1.5, [(3, 4)], {"positive": True}),
    ("pow_neg", lambda a: a ** -2, [(3,)], {"positive": True}),
    ("matmul", lambda a, b: a @ b, [(3, 4), (4, 5)], {}),
    ("matmul_vec_right", lambda a, b: a @ b, [(3, 4), (4,)], {}),
    ("matmul_vec_left", lambda a, b: a @ b, [(4,), (4, 5)], {}),
    ("matmul_batched", lambda a, b: a @ b, [(2, 3, 4), (2, 4, 5)], {}),
    ("matmul_batch_broadcast", lambda a, b: a @ b, [(2, 3, 4), (4, 5)], {}),
    ("exp", lambda a: a.exp(), [(3, 4)], {}),
    ("log", lambda a: a.log(), [(3, 4)], {"positive": True}),
    ("tanh", lambda a: a.tanh(), [(3, 4)], {}),
    ("relu", lambda a: a.relu(), [(3, 4)], {}),
    ("sigmoid", lambda a: a.sigmoid(), [(3, 4)], {}),
    ("sum_all", lambda a: a.sum(), [(3, 4)], {}),
    ("sum_axis0", lambda a: a.sum(axis=0), [(3, 4)], {}),
    ("sum_axis_keepdims", lambda a: a.sum(axis=1, keepdims=True), [(3, 4)], {}),
    ("sum_axes", lambda a: a.sum(axis=(0, 2)), [(2, 3, 4)], {}),
    ("mean_all", lambda a: a.mean(), [(3, 4)], {}),
    ("mean_axis", lambda a: a.mean(axis=-1), [(3, 4)], {}),
    ("mean_keepdims", lambda a: a.mean(axis=0, keepdims=True), [(3, 4)], {}),
    ("max_all", lambda a: a.max(), [(3, 4)], {}),
    ("max_axis", lambda a: a.max(axis=1), [(3, 4)], {}),
    ("max_keepdims", lambda a: a.max(axis=0, keepdims=True), [(3, 4)], {}),
    ("reshape", lambda a: a.reshape(4, 3), [(3, 4)], {}),
    ("reshape_tuple", lambda a: a.reshape((2, 6)), [(3, 4)], {}),
    ("transpose", lambda a: a.transpose(), [(3, 4)], {}),
    ("transpose_axes", lambda a: a.transpose(2, 0, 1), [(2, 3, 4)], {}),
    ("T", lambda a: a.T, [(3, 4)], {}),
    ("index_int", lambda a: a[1], [(3, 4)], {}),
    ("index_slice", lambda a: a[1:, ::2], [(3, 4)], {}),
    ("index_array_repeat", lambda a: a[np.array([0, 2, 0, 0])], [(3, 4)], {}),
    ("index_pairs", lambda a: a[np.array([0, 1, 1]), np.array([3, 0, 0])], [(3, 4)], {}),
    ("index_bool", lambda a: a[np.array([True, False, True])], [(3, 4)], {}),
    ("concatenate0", lambda a, b: dp.concatenate([a, b], axis=0), [(2, 3), (4, 3)], {}),
    ("concatenate1", lambda a, b, c: dp.concatenate([a, b, c], axis=1), [(2, 3), (2, 1), (2, 2)], {}),
    ("log_softmax", lambda a: a.log_softmax(axis=-1), [(3, 5)], {}),
    ("log_softmax_axis0", lambda a: a.log_softmax(axis=0), [(3, 5)], {}),
    ("softmax", lambda a: a.softmax(axis=-1), [(3, 5)], {}),
    ("linear", lambda x, w, b: F.linear(x, w, b), [(5, 3), (4, 3), (4,)], {}),
    ("linear_nobias", lambda x, w: F.linear(x, w), [(5, 3), (4, 3)], {}),
    ("cross_entropy", lambda z: F.cross_entropy(z, np.array([0, 2, 1, 2])), [(4, 3)], {}),
    ("cross_entropy_sum", lambda z: F.cross_entropy(z, np.array([1, 0]), reduction="sum"), [(2, 3)], {}),
    ("mse", lambda a, b: F.mse_loss(a, b), [(4, 2), (4, 2)], {}),
    ("mse_sum", lambda a, b: F.mse_loss(a, b, reduction="sum"), [(4, 2), (4, 2)], {}),
    ("composite", lambda a, b: ((a @ b).tanh() * 2 - a.sum(axis=1, keepdims=True)).exp().mean(axis=0),
     [(3, 4), (4, 2)], {}),
]


@pytest.mark.parametrize("name,fn,shapes,opts", OPS, ids=[op[0] for op in OPS])
def test_op_gradient(name, fn, shapes, opts):
    check_op(fn, *shapes, **opts)


def test_max_ties_share_the_gradient():
    x = dp.Tensor(np.array([1.0, 3.0, 3.0]), requires_grad=True)
    x.max().backward()
    np.testing.assert_allclose(x.grad, [0.0, 0.5, 0.5])


def test_softmax_is_stable_for_large_logits():
    z = dp.Tensor(np.array([[1000.0, 0.0], [-1000.0, 1000.0]]))
    assert np.isfinite(z.softmax().data).all() and np.isfinite(z.log_softmax().data).all()
    loss = F.cross_entropy(dp.Tensor(np.array([[1000.0, -1000.0]]), requires_grad=True), np.array([1]))
    assert np.isclose(loss.item(), 2000.0)


def test_sigmoid_does_not_overflow():
    x = dp.Tensor(np.array([-1000.0, 0.0, 1000.0]))
    np.testing.assert_allclose(x.sigmoid().data, [0.0, 0.5, 1.0])


# --------------------------------------------------------------------------- against the Value engine

def _random_program(rng, n_inputs=3, n_ops=12):
    """A random expression over scalar inputs, as a list of (op, argument indices)."""
    unary = ["exp_small", "tanh", "relu", "sigmoid", "neg", "square", "log_abs"]
    binary = ["add", "sub", "mul", "div_safe"]
    program = []
    for k in range(n_ops):
        pool = n_inputs + k
        if rng.random() < 0.5:
            program.append((unary[rng.integers(len(unary))], (int(rng.integers(pool)),)))
        else:
            program.append((binary[rng.integers(len(binary))], (int(rng.integers(pool)), int(rng.integers(pool)))))
    return program


def _run_program(program, inputs):
    nodes = list(inputs)
    for op, args in program:
        a = nodes[args[0]]
        b = nodes[args[1]] if len(args) > 1 else None
        nodes.append({
            "exp_small": lambda: (a * 0.1).exp(),
            "tanh": lambda: a.tanh(),
            "relu": lambda: a.relu(),
            "sigmoid": lambda: a.sigmoid(),
            "neg": lambda: -a,
            "square": lambda: a ** 2,
            "log_abs": lambda: (a * a + 1.0).log(),
            "add": lambda: a + b,
            "sub": lambda: a - b,
            "mul": lambda: a * b,
            "div_safe": lambda: a / (b * b + 1.0),
        }[op]())
    total = nodes[len(inputs)]
    for n in nodes[len(inputs) + 1:]:
        total = total + n
    return total


@pytest.mark.parametrize("seed", range(20))
def test_random_graphs_match_value_engine(seed):
    rng = np.random.default_rng(seed)
    program = _random_program(rng)
    xs = rng.standard_normal(3)
    values = [dp.Value(x) for x in xs]
    tensors = [dp.Tensor(np.array(x), requires_grad=True, dtype="float64") for x in xs]
    out_v = _run_program(program, values)
    out_t = _run_program(program, tensors)
    out_v.backward()
    out_t.backward()
    assert np.isclose(out_t.item(), out_v.data, rtol=1e-12)
    for v, t in zip(values, tensors):
        got = 0.0 if t.grad is None else float(t.grad)
        assert np.isclose(got, v.grad, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- the graph walk

def test_long_chain_has_no_recursion_error():
    x = dp.Tensor(np.array(1.0), requires_grad=True, dtype="float64")
    y = x
    for _ in range(100_000):
        y = y * 1.0
    y.backward()
    assert x.grad == 1.0


def test_value_long_chain_has_no_recursion_error():
    x = dp.Value(1.0)
    y = x
    for _ in range(100_000):
        y = y + 0.0
    y.backward()
    assert x.grad == 1.0


def test_node_used_twice_gets_both_gradients():
    x = dp.Tensor(np.array([2.0, 3.0]), requires_grad=True, dtype="float64")
    y = x * x + x  # x appears three times
    y.sum().backward()
    np.testing.assert_allclose(x.grad, 2 * np.array([2.0, 3.0]) + 1)
    a = dp.Tensor(np.array([1.0]), requires_grad=True)
    b = a + a
    (b * b).sum().backward()
    np.testing.assert_allclose(a.grad, [8.0])  # d(4a^2)/da


def test_gradients_accumulate_across_backward_calls():
    x = dp.Tensor(np.array([1.0, 2.0]), requires_grad=True)
    (x * 3).sum().backward()
    (x * 3).sum().backward()
    np.testing.assert_allclose(x.grad, [6.0, 6.0])


def test_leaf_gradients_are_not_aliased():
    a = dp.Tensor(np.ones(3), requires_grad=True)
    b = dp.Tensor(np.ones(3), requires_grad=True)
    (a + b).sum().backward()
    a.grad += 1
    np.testing.assert_allclose(b.grad, np.ones(3))


def test_graph_is_freed_without_the_cycle_collector():
    gc.disable()
    try:
        x = dp.Tensor(np.ones((4, 3)), requires_grad=True)
        h = (x * 2).tanh()
        ref = weakref.ref(h)
        loss = h.sum()
        del h
        assert ref() is not None  # kept alive by the graph
        loss.backward()
        assert loss._parents == ()
        assert ref() is None, "an intermediate node survived backward: a reference cycle?"
    finally:
        gc.enable()


def test_backward_twice_needs_retain_graph():
    x = dp.Tensor(np.ones(2), requires_grad=True)
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad, [4.0, 4.0])
    with pytest.raises(RuntimeError, match="freed"):
        y.backward()


def test_no_grad_records_nothing():
    x = dp.Tensor(np.ones(3), requires_grad=True)
    with dp.no_grad():
        y = x * 2 + 1
        assert not dp.is_grad_enabled()
    assert dp.is_grad_enabled()
    assert not y.requires_grad and y._parents == () and y.is_leaf


def test_detach_cuts_the_graph():
    x = dp.Tensor(np.ones(3), requires_grad=True)
    d = (x * 2).detach()
    assert not d.requires_grad
    (x * d).sum().backward()
    np.testing.assert_allclose(x.grad, [2.0, 2.0, 2.0])


# --------------------------------------------------------------------------- dtypes and errors

def test_dtypes():
    assert dp.Tensor([1, 2]).dtype == np.float32
    assert dp.Tensor(3.0).dtype == np.float32
    assert dp.Tensor([1, 2], dtype="float64").dtype == np.float64
    assert dp.Tensor(np.ones(2)).dtype == np.float64  # a float64 array keeps its dtype
    x = dp.Tensor(np.ones(2, np.float32))
    assert (x * 2.0).dtype == np.float32 and (x + np.ones(2)).dtype == np.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        dp.Tensor([1.0], dtype="float16")


def test_errors_name_the_op_and_shapes():
    a, b = dp.Tensor(np.ones((3, 4))), dp.Tensor(np.ones((5, 2)))
    with pytest.raises(ValueError, match=r"matmul: shapes \(3, 4\) and \(5, 2\) are not aligned"):
        a @ b
    x = dp.Tensor(np.ones((2, 2)), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"shape \(2, 2\)"):
        (x * 2).backward()
    with pytest.raises(ValueError, match=r"grad has shape \(3,\)"):
        (x * 2).backward(np.ones(3))
    with pytest.raises(RuntimeError, match="does not require grad"):
        dp.Tensor(np.ones(1)).backward()
    with pytest.raises(ValueError, match=r"cannot reshape a tensor of shape \(2, 2\)"):
        x.reshape(3)
    with pytest.raises(TypeError, match="exponent"):
        x ** x
    with pytest.raises(ValueError, match="labels of shape"):
        F.cross_entropy(dp.Tensor(np.ones((2, 3))), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        F.cross_entropy(dp.Tensor(np.ones((2, 3))), np.array([0, 3]))
    with pytest.raises(ValueError, match="reduction"):
        F.mse_loss(x, x, reduction="avg")
    with pytest.raises(ValueError, match="linear: input of shape"):
        F.linear(dp.Tensor(np.ones((2, 3))), dp.Tensor(np.ones((4, 5))))
