"""The nn layers: every op's gradient against central differences in float64, shapes and
values against direct computations, PyTorch's names and initialisations, dropout's purity."""

import numpy as np
import pytest

import dptrain as dp
import dptrain.nn.functional as F
from dptrain import nn
from gradcheck import check_op

def _dropout(x):
    with nn.random.context(seed=1, step=3, positions=np.arange(x.shape[0])):
        return F.dropout(x, 0.3, True, key=7)


def _attention_dropout(qkv):
    with nn.random.context(seed=1, step=3, positions=np.arange(qkv.shape[0])):
        return F.self_attention(qkv, 2, causal=True, dropout_p=0.4, key=5)


_SEQ_LABELS = np.array([[0, 2, 1], [3, 3, 0]])
_EMB_INDEX = np.array([[0, 2, 2], [1, 0, 2]])

# (name, function of tensors, input shapes) -- one line per layer op; test_gpu.py runs them on cupy
LAYER_OPS = [
    ("conv1d_stride_pad", lambda x, w, b: F.conv(x, w, b, 2, 1), [(2, 3, 11), (4, 3, 5), (4,)]),
    ("conv1d_plain", lambda x, w, b: F.conv(x, w, b, 1, 0), [(2, 1, 7), (2, 1, 3), (2,)]),
    ("conv2d_pad", lambda x, w, b: F.conv(x, w, b, 1, 1), [(2, 2, 6, 7), (3, 2, 3, 3), (3,)]),
    ("conv2d_mixed", lambda x, w, b: F.conv(x, w, b, (2, 1), (0, 1)), [(1, 2, 7, 6), (2, 2, 3, 2), (2,)]),
    ("max_pool1d", lambda x: F.max_pool1d(x, 2), [(2, 3, 9)]),
    ("max_pool1d_overlap_pad", lambda x: F.max_pool1d(x, 3, 2, 1), [(2, 2, 10)]),
    ("max_pool2d", lambda x: F.max_pool2d(x, 2), [(2, 2, 6, 6)]),
    ("max_pool2d_overlap_pad", lambda x: F.max_pool2d(x, 3, 2, 1), [(1, 2, 7, 5)]),
    ("avg_pool1d", lambda x: F.avg_pool1d(x, 2), [(2, 3, 9)]),
    ("avg_pool1d_overlap_pad", lambda x: F.avg_pool1d(x, 3, 2, 1), [(2, 2, 10)]),
    ("avg_pool2d", lambda x: F.avg_pool2d(x, 2), [(2, 2, 6, 6)]),
    ("avg_pool2d_overlap_pad", lambda x: F.avg_pool2d(x, 3, 2, 1), [(1, 2, 7, 5)]),
    ("layer_norm", lambda x, w, b: F.layer_norm(x, (5,), w, b), [(4, 3, 5), (5,), (5,)]),
    ("layer_norm_2d", lambda x, w, b: F.layer_norm(x, (3, 4), w, b), [(2, 3, 4), (3, 4), (3, 4)]),
    ("layer_norm_no_bias", lambda x, w: F.layer_norm(x, (5,), w, None), [(4, 3, 5), (5,)]),
    ("gelu", lambda x: F.gelu(x), [(3, 7)]),
    ("gelu_tanh", lambda x: F.gelu(x, "tanh"), [(3, 7)]),
    ("self_attention_causal", lambda qkv: F.self_attention(qkv, 2, causal=True), [(2, 5, 12)]),
    ("self_attention_full", lambda qkv: F.self_attention(qkv, 2, causal=False), [(2, 5, 12)]),
    ("self_attention_dropout", _attention_dropout, [(2, 5, 12)]),
    ("linear_leading_axes", lambda x, w, b: F.linear(x, w, b), [(2, 3, 4), (5, 4), (5,)]),
    ("cross_entropy_sequence", lambda z: F.cross_entropy(z, _SEQ_LABELS, reduction="sum"), [(2, 3, 4)]),
    ("embedding_repeats", lambda w: F.embedding(_EMB_INDEX, w), [(4, 3)]),
    ("dropout", _dropout, [(4, 6)]),
]


@pytest.mark.parametrize("name,fn,shapes", LAYER_OPS, ids=[op[0] for op in LAYER_OPS])
def test_layer_gradients(name, fn, shapes):
    check_op(fn, *shapes)


@pytest.mark.parametrize("name,fn,shapes", LAYER_OPS, ids=[op[0] for op in LAYER_OPS])
def test_layer_float32_agrees_with_float64(name, fn, shapes):
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(s) for s in shapes]
    outs, grads = {}, {}
    for dt in ("float32", "float64"):
        ts = [dp.Tensor(a, requires_grad=True, dtype=dt) for a in arrays]
        out = fn(*ts)
        assert out.dtype == np.dtype(dt), f"{name} gave {out.dtype} for {dt} inputs"
        out.backward(np.ones(out.shape, dtype=dt))
        outs[dt], grads[dt] = out.data, [t.grad for t in ts]
        assert all(g.dtype == np.dtype(dt) for g in grads[dt])
    np.testing.assert_allclose(outs["float32"], outs["float64"], rtol=2e-4, atol=2e-5)
    for g32, g64 in zip(grads["float32"], grads["float64"]):
        np.testing.assert_allclose(g32, g64, rtol=2e-3, atol=2e-4)


def test_gelu_without_scipy_is_the_same(monkeypatch):
    import sys
    x = np.random.default_rng(0).standard_normal(50)
    with_scipy = dp.backend.erf(x)
    monkeypatch.setitem(sys.modules, "scipy.special", None)  # import fails: math.erf element-wise
    np.testing.assert_allclose(dp.backend.erf(x), with_scipy, rtol=1e-14)


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


def test_layer_norm_without_bias_has_only_its_weight():
    """LayerNorm(..., bias=False), as PyTorch 2.1+: parameters and state_dict hold the weight
    only, and the output is the affine one's with a zero bias."""
    ln, plain = nn.LayerNorm(6, bias=False, dtype="float64"), nn.LayerNorm(6, dtype="float64")
    assert [n for n, _ in ln.named_parameters()] == ["weight"] and list(ln.state_dict()) == ["weight"]
    x = dp.Tensor(np.random.default_rng(4).standard_normal((3, 6)))
    ln.weight.data[:] = plain.weight.data[:] = np.linspace(0.5, 2, 6)
    np.testing.assert_array_equal(ln(x).data, plain(x).data)
    assert nn.LayerNorm(6, elementwise_affine=False, bias=True).parameters() == []


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


def test_attention_dropout_drops_weights_as_a_direct_computation():
    """dropout(softmax(q k^T / sqrt(d))) v with the mask nn.random gives the weights' shape; off in
    eval mode; a module's dropout reaches it (TransformerBlock passes its own, as PyTorch's)."""
    rng = np.random.default_rng(3)
    b, t, h, d = 2, 5, 2, 3
    qkv = rng.standard_normal((b, t, 3 * h * d))
    positions = np.arange(b)
    with nn.random.context(seed=4, step=2, positions=positions):
        out = F.self_attention(dp.Tensor(qkv), h, causal=True, dropout_p=0.5, key=9).data
        kept = (nn.random.uniform(np, (b, h, t, t), np.float64, 9) >= 0.5) * 2.0
        plain = F.self_attention(dp.Tensor(qkv), h, causal=True, dropout_p=0.5, training=False, key=9).data
    q, k, v = qkv.reshape(b, t, 3, h, d).transpose(2, 0, 3, 1, 4)
    scores = q @ k.swapaxes(-1, -2) / np.sqrt(d) + np.triu(np.full((t, t), -np.inf), 1)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expect = ((weights * kept) @ v).transpose(0, 2, 1, 3).reshape(b, t, h * d)
    np.testing.assert_allclose(out, expect, rtol=1e-12)
    np.testing.assert_allclose(plain, (weights @ v).transpose(0, 2, 1, 3).reshape(b, t, h * d), rtol=1e-12)
    shorter = F.self_attention(dp.Tensor(qkv[:, :3]), h, causal=True).data  # the longer mask's corner
    s3 = scores[:, :, :3, :3]
    w3 = np.exp(s3 - s3.max(-1, keepdims=True))
    w3 /= w3.sum(-1, keepdims=True)
    np.testing.assert_allclose(shorter, (w3 @ v[:, :, :3]).transpose(0, 2, 1, 3).reshape(b, 3, h * d), rtol=1e-12)
    assert nn.TransformerBlock(6, 2, dropout=0.3).self_attn.dropout == 0.3
    with pytest.raises(ValueError, match="dropout"):
        nn.MultiheadSelfAttention(6, 2, dropout=1.0)


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
