"""The nn layers: every op's gradient against central differences in float64, shapes and
values against direct computations, PyTorch's names and initialisations, dropout's purity."""

import numpy as np
import pytest

import dptrain as dp
import dptrain.nn.functional as F
from dptrain import nn
from gradcheck import check_op

CONV_CASES = [  # (x shape, weight shape, stride, padding)
    ((2, 3, 11), (4, 3, 5), 2, 1),
    ((2, 1, 7), (2, 1, 3), 1, 0),
    ((2, 2, 6, 7), (3, 2, 3, 3), 1, 1),
    ((1, 2, 7, 6), (2, 2, 3, 2), (2, 1), (0, 1)),
]


@pytest.mark.parametrize("xs,ws,stride,padding", CONV_CASES)
def test_conv_gradients(xs, ws, stride, padding):
    check_op(lambda x, w, b: F.conv(x, w, b, stride, padding), xs, ws, (ws[0],))


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("nd,xs,kernel,stride,padding", [(1, (2, 3, 9), 2, None, 0), (1, (2, 2, 10), 3, 2, 1),
                                                         (2, (2, 2, 6, 6), 2, None, 0), (2, (1, 2, 7, 5), 3, 2, 1)])
def test_pool_gradients(kind, nd, xs, kernel, stride, padding):
    check_op(lambda x: F._pool(x, nd, kernel, stride, padding, kind), xs)


@pytest.mark.parametrize("xs,shape", [((4, 3, 5), (5,)), ((2, 3, 4), (3, 4))])
def test_layer_norm_gradients(xs, shape):
    check_op(lambda x, w, b: F.layer_norm(x, shape, w, b), xs, shape, shape)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_gradient(approximate):
    check_op(lambda x: F.gelu(x, approximate), (3, 7))


@pytest.mark.parametrize("causal", [True, False])
def test_self_attention_gradient(causal):
    check_op(lambda qkv: F.self_attention(qkv, num_heads=2, causal=causal), (2, 5, 12))


def test_linear_over_leading_axes_gradient():
    check_op(lambda x, w, b: F.linear(x, w, b), (2, 3, 4), (5, 4), (5,))


def test_sequence_cross_entropy_gradient():
    y = np.array([[0, 2, 1], [3, 3, 0]])
    check_op(lambda z: F.cross_entropy(z, y, reduction="sum"), (2, 3, 4))


def test_embedding_gradient_adds_repeated_indices():
    idx = np.array([[0, 2, 2], [1, 0, 2]])
    check_op(lambda w: F.embedding(idx, w), (4, 3))


def test_dropout_gradient_uses_its_mask():
    with nn.random.context(seed=1, step=3, positions=np.arange(4)):
        check_op(lambda x: F.dropout(x, 0.3, True, key=7), (4, 6))


# --------------------------------------------------------------------------- forward values

def test_conv1d_matches_a_direct_sum():
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 3, 10)), rng.standard_normal((4, 3, 3)), rng.standard_normal(4)
    out = F.conv1d(dp.Tensor(x), dp.Tensor(w), dp.Tensor(b), stride=2, padding=1).data
    xp = np.pad(x, [(0, 0), (0, 0), (1, 1)])
    lout = (10 + 2 - 3) // 2 + 1
    ref = np.stack([np.einsum("nck,ock->no", xp[:, :, 2 * i:2 * i + 3], w) + b for i in range(lout)], axis=2)
    np.testing.assert_allclose(out, ref, rtol=1e-12)


def test_pools_match_direct_computations():
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 6))
    mx = F.max_pool2d(dp.Tensor(x), 2).data
    avg = F.avg_pool2d(dp.Tensor(x), 2).data
    blocks = x.reshape(2, 3, 2, 2, 3, 2)
    np.testing.assert_array_equal(mx, blocks.max(axis=(3, 5)))
    np.testing.assert_allclose(avg, blocks.mean(axis=(3, 5)), rtol=1e-12)


def test_causal_attention_does_not_look_ahead():
    rng = np.random.default_rng(2)
    attn = nn.MultiheadSelfAttention(8, 2, dtype="float64", rng=rng)
    x = rng.standard_normal((1, 6, 8))
    y1 = attn(dp.Tensor(x)).data
    x2 = x.copy()
    x2[0, 4:] += 10.0  # changing later positions leaves earlier outputs unchanged
    y2 = attn(dp.Tensor(x2)).data
    np.testing.assert_allclose(y1[0, :4], y2[0, :4], rtol=1e-12)
    assert not np.allclose(y1[0, 4:], y2[0, 4:])


def test_layer_norm_normalizes():
    x = np.random.default_rng(3).standard_normal((4, 10)) * 5 + 3
    out = nn.LayerNorm(10, dtype="float64")(dp.Tensor(x)).data
    np.testing.assert_allclose(out.mean(axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=1), 1, rtol=1e-4)


def test_flatten_and_mlp_on_images():
    x = dp.Tensor(np.ones((3, 1, 4, 4)))
    assert nn.Flatten()(x).shape == (3, 16)
    assert nn.MLP([16, 5, 2], seed=0)(x).shape == (3, 2)


# --------------------------------------------------------------------------- PyTorch's names and inits

def test_names_and_shapes_follow_pytorch():
    block = nn.TransformerBlock(8, 2, dim_feedforward=16)
    names = [n for n, _ in block.named_parameters()]
    assert names == ["norm1.weight", "norm1.bias", "self_attn.in_proj_weight", "self_attn.in_proj_bias",
                     "self_attn.out_proj.weight", "self_attn.out_proj.bias", "norm2.weight", "norm2.bias",
                     "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"]
    conv = nn.Conv2d(3, 6, 5)
    assert list(conv.state_dict()) == ["weight", "bias"] and conv.weight.shape == (6, 3, 5, 5)
    assert nn.Embedding(10, 4).weight.shape == (10, 4)


def test_default_initialisations():
    nn.manual_seed(0)
    conv = nn.Conv1d(4, 50, 5)
    bound = 1 / np.sqrt(4 * 5)
    assert 0.9 * bound < np.abs(conv.weight.data).max() <= bound and np.abs(conv.bias.data).max() <= bound
    ln = nn.LayerNorm(6)
    assert (ln.weight.data == 1).all() and (ln.bias.data == 0).all()
    emb = nn.Embedding(1000, 20)
    assert abs(emb.weight.data.std() - 1) < 0.05
    attn = nn.MultiheadSelfAttention(16, 4)
    assert (attn.in_proj_bias.data == 0).all() and (attn.out_proj.bias.data == 0).all()
    assert np.abs(attn.in_proj_weight.data).max() <= np.sqrt(6 / 64)


def test_manual_seed_makes_builders_reproducible():
    def build():
        return nn.Sequential(nn.Conv1d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 8, 3))
    nn.manual_seed(5)
    a = build().state_dict()
    nn.manual_seed(5)
    b = build().state_dict()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_module_to_dtype():
    m = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4, 3)).to("float64")
    assert all(p.dtype == np.float64 for p in m.parameters())
    assert m.flat().data.dtype == np.float64


# --------------------------------------------------------------------------- dropout

def test_dropout_is_off_in_eval_mode_and_scales_in_training():
    d = nn.Dropout(0.5)
    x = dp.Tensor(np.ones((200, 50)))
    with nn.random.context(0, 0, np.arange(200)):
        y = d(x).data
    assert set(np.unique(y)) == {0.0, 2.0} and abs((y == 0).mean() - 0.5) < 0.02
    d.eval()
    assert d(x) is x


def test_dropout_masks_are_a_function_of_seed_step_position_and_layer():
    x = np.ones((6, 10))

    def mask(seed, step, positions, key):
        with nn.random.context(seed, step, positions):
            return F.dropout(dp.Tensor(x[:len(positions)]), 0.5, True, key).data

    whole = mask(0, 3, np.arange(6), 1)
    # the same examples split over two "workers" draw the same masks
    np.testing.assert_array_equal(np.concatenate([mask(0, 3, np.arange(4), 1), mask(0, 3, np.arange(4, 6), 1)]),
                                  whole)
    np.testing.assert_array_equal(mask(0, 3, np.arange(6), 1), whole)  # replayed: the same
    for other in (mask(1, 3, np.arange(6), 1), mask(0, 4, np.arange(6), 1), mask(0, 3, np.arange(6), 2)):
        assert not np.array_equal(other, whole)


def test_bad_layer_arguments_are_named():
    with pytest.raises(ValueError, match="channels"):
        F.conv1d(dp.Tensor(np.ones((2, 3, 10))), dp.Tensor(np.ones((4, 2, 3))))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        F.conv1d(dp.Tensor(np.ones((2, 1, 2))), dp.Tensor(np.ones((4, 1, 3))))
    with pytest.raises(ValueError, match="indices must lie"):
        F.embedding(np.array([5]), dp.Tensor(np.ones((3, 2))))
    with pytest.raises(ValueError, match="multiple of"):
        nn.MultiheadSelfAttention(10, 3)
    with pytest.raises(ValueError, match="p must be"):
        nn.Dropout(1.0)
