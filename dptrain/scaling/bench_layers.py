"""Layer benchmark: a training step of the MNIST-1D CNN and of a transformer block, engine
against hand-written numpy (and PyTorch eager on one thread, where torch is installed).

    dptrain bench                  # runs this with the MLP benchmark (dptrain/scaling/bench.py)

Each hand-written step is the same algorithm written out: im2col as a strided view and
one matrix product per convolution, col2im by kernel offset, the same attention and
layer-norm formulas, the same SGD update. The engine's target is <= 1.2x of it.
- ConvBase (Greydanus 2020): three Conv1d of 25 channels (kernel 5, 3, 3; stride 2,
  padding 1), ReLU, a linear layer to 10 classes; batch 100 of length 40; cross-entropy.
- A pre-norm transformer block (d_model 128, 4 heads, feed-forward 512, causal, exact
  GELU) on a batch of 16 sequences of 64; the loss is sum(output * G) for a fixed random
  G scaled by 1 / (batch * positions), so repeated steps stay finite.
"""

from __future__ import annotations

import math

import numpy as np

import dptrain as dp
import dptrain.nn.functional as F
from dptrain import backend
from dptrain.models import ConvBase

LR = 0.01
CNN_BATCH, CNN_LENGTH, CLASSES = 100, 40, 10
BLOCK = dict(batch=16, seq=64, d_model=128, heads=4, ff=512)


def _windows(xp, kernel, stride):
    n, c, length = xp.shape
    out = (length - kernel) // stride + 1
    s = xp.strides
    return np.lib.stride_tricks.as_strided(xp, (n, c, out, kernel), (s[0], s[1], s[2] * stride, s[2]),
                                           writeable=False), out


class HandWrittenConvBase:
    """ConvBase's forward, backward and SGD step in plain numpy (weights copied from an engine model)."""

    def __init__(self, model: ConvBase):
        self.p = {name: value.copy() for name, value in model.state_dict().items()}

    def _conv(self, x, name, stride=2, pad=1):
        w, b = self.p[name + ".weight"], self.p[name + ".bias"]
        xp = np.pad(x, ((0, 0), (0, 0), (pad, pad)))
        win, out = _windows(xp, w.shape[2], stride)
        n, c = x.shape[:2]
        cols = win.transpose(0, 2, 1, 3).reshape(n * out, -1)
        y = cols @ w.reshape(w.shape[0], -1).T + b
        return y.reshape(n, out, -1).transpose(0, 2, 1), (xp.shape, cols, out)

    def _conv_back(self, g, name, cache, grads, stride=2, pad=1):
        w = self.p[name + ".weight"]
        shape, cols, out = cache
        n, c, length = shape
        gm = g.transpose(0, 2, 1).reshape(n * out, -1)
        grads[name + ".weight"] = (gm.T @ cols).reshape(w.shape)
        grads[name + ".bias"] = gm.sum(axis=0)
        gcols = (gm @ w.reshape(w.shape[0], -1)).reshape(n, out, c, w.shape[2])
        gx = np.zeros(shape, dtype=g.dtype)
        for k in range(w.shape[2]):
            gx[:, :, k:k + stride * (out - 1) + 1:stride] += gcols[:, :, :, k].transpose(0, 2, 1)
        return gx[:, :, pad:length - pad]

    def step(self, x, y):
        p, grads = self.p, {}
        h0 = x.reshape(len(x), 1, -1)
        z1, c1 = self._conv(h0, "conv1")
        h1 = np.maximum(z1, 0)
        z2, c2 = self._conv(h1, "conv2")
        h2 = np.maximum(z2, 0)
        z3, c3 = self._conv(h2, "conv3")
        h3 = np.maximum(z3, 0)
        flat = h3.reshape(len(x), -1)
        logits = flat @ p["linear.weight"].T + p["linear.bias"]
        z = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(z)
        probs = e / e.sum(axis=1, keepdims=True)
        loss = -np.log(probs[np.arange(len(y)), y]).mean()
        g = probs
        g[np.arange(len(y)), y] -= 1
        g /= len(y)
        grads["linear.weight"], grads["linear.bias"] = g.T @ flat, g.sum(axis=0)
        g = (g @ p["linear.weight"]).reshape(h3.shape) * (z3 > 0)
        g = self._conv_back(g, "conv3", c3, grads) * (z2 > 0)
        g = self._conv_back(g, "conv2", c2, grads) * (z1 > 0)
        self._conv_back(g, "conv1", c1, grads)
        for name, grad in grads.items():
            p[name] -= LR * grad
        return loss


def _layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(axis=-1, keepdims=True)
    c = x - mu
    rstd = 1.0 / np.sqrt((c * c).mean(axis=-1, keepdims=True) + x.dtype.type(eps))
    xhat = c * rstd
    return xhat * w + b, (xhat, rstd)


def _layer_norm_back(g, w, cache):
    xhat, rstd = cache
    lead = tuple(range(g.ndim - 1))
    gw, gb = (g * xhat).sum(axis=lead), g.sum(axis=lead)
    gx = g * w
    m = g.shape[-1]
    gx = rstd * (gx - gx.sum(axis=-1, keepdims=True) / m - xhat * (gx * xhat).sum(axis=-1, keepdims=True) / m)
    return gx, gw, gb


class HandWrittenBlock:
    """The pre-norm block's forward, backward and SGD step in plain numpy (same names as the engine's)."""

    def __init__(self, block: dp.nn.TransformerBlock, heads: int):
        self.p = {name: value.copy() for name, value in block.state_dict().items()}
        self.heads = heads

    def step(self, x, G):
        p, grads, H = self.p, {}, self.heads
        b, t, e = x.shape
        d = e // H
        dt = x.dtype.type
        a1, ln1 = _layer_norm(x, p["norm1.weight"], p["norm1.bias"])
        a1m = a1.reshape(-1, e)
        qkv = a1m @ p["self_attn.in_proj_weight"].T + p["self_attn.in_proj_bias"]
        heads = qkv.reshape(b, t, 3, H, d).transpose(2, 0, 3, 1, 4)
        q, k, v = heads[0], heads[1], heads[2]
        scale = dt(1 / math.sqrt(d))
        s = (q @ k.swapaxes(-1, -2)) * scale
        s = np.where(np.triu(np.ones((t, t), dtype=bool), k=1), dt(-np.inf), s)
        s -= s.max(axis=-1, keepdims=True)
        pr = np.exp(s)
        pr /= pr.sum(axis=-1, keepdims=True)
        att = (pr @ v).transpose(0, 2, 1, 3).reshape(b * t, e)
        o = att @ p["self_attn.out_proj.weight"].T + p["self_attn.out_proj.bias"]
        x1 = x + o.reshape(b, t, e)
        a2, ln2 = _layer_norm(x1, p["norm2.weight"], p["norm2.bias"])
        a2m = a2.reshape(-1, e)
        u = a2m @ p["linear1.weight"].T + p["linear1.bias"]
        cdf = dt(0.5) * (dt(1) + backend.erf(u * dt(1 / math.sqrt(2))))
        act = u * cdf
        out = x1 + (act @ p["linear2.weight"].T + p["linear2.bias"]).reshape(b, t, e)
        loss = float((out * G).sum())
        # backward
        g = G.reshape(-1, e)
        grads["linear2.weight"], grads["linear2.bias"] = g.T @ act, g.sum(axis=0)
        gact = g @ p["linear2.weight"]
        gu = gact * (cdf + u * np.exp(dt(-0.5) * u * u) * dt(1 / math.sqrt(2 * math.pi)))
        grads["linear1.weight"], grads["linear1.bias"] = gu.T @ a2m, gu.sum(axis=0)
        ga2 = (gu @ p["linear1.weight"]).reshape(b, t, e)
        gx1, grads["norm2.weight"], grads["norm2.bias"] = _layer_norm_back(ga2, p["norm2.weight"], ln2)
        gx1 = gx1 + G
        go = gx1.reshape(-1, e)
        grads["self_attn.out_proj.weight"], grads["self_attn.out_proj.bias"] = go.T @ att, go.sum(axis=0)
        gatt = (go @ p["self_attn.out_proj.weight"]).reshape(b, t, H, d).transpose(0, 2, 1, 3)
        gv = pr.swapaxes(-1, -2) @ gatt
        gp = gatt @ v.swapaxes(-1, -2)
        gs = pr * (gp - (gp * pr).sum(axis=-1, keepdims=True)) * scale
        gq, gk = gs @ k, gs.swapaxes(-1, -2) @ q
        gqkv = np.stack([gq, gk, gv]).transpose(1, 3, 0, 2, 4).reshape(-1, 3 * e)
        grads["self_attn.in_proj_weight"], grads["self_attn.in_proj_bias"] = gqkv.T @ a1m, gqkv.sum(axis=0)
        ga1 = (gqkv @ p["self_attn.in_proj_weight"]).reshape(b, t, e)
        _, grads["norm1.weight"], grads["norm1.bias"] = _layer_norm_back(ga1, p["norm1.weight"], ln1)
        for name, grad in grads.items():
            p[name] -= LR * grad
        return loss


class EngineStep:
    """model forward, loss, backward and SGD on dptrain's engine."""

    def __init__(self, model, loss):
        self.model, self.loss = model, loss
        self.opt = dp.optim.SGD(model.parameters(), lr=LR, momentum=0.0)

    def step(self, x, y):
        self.opt.zero_grad()
        loss = self.loss(self.model(dp.Tensor(x)), y)
        loss.backward()
        self.opt.step()
        return float(loss.data)


def _torch_steps(cnn: ConvBase, block: dp.nn.TransformerBlock):
    """The same two steps in PyTorch eager on one thread, or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(1)
    tnn = torch.nn

    class TorchConvBase(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = tnn.Conv1d(1, 25, 5, stride=2, padding=1)
            self.conv2 = tnn.Conv1d(25, 25, 3, stride=2, padding=1)
            self.conv3 = tnn.Conv1d(25, 25, 3, stride=2, padding=1)
            self.linear = tnn.Linear(125, CLASSES)

        def forward(self, x):
            h = self.conv3(self.conv2(self.conv1(x.view(-1, 1, x.shape[-1])).relu()).relu()).relu()
            return self.linear(h.view(h.shape[0], -1))

    tcnn = TorchConvBase()
    tcnn.load_state_dict({k: torch.from_numpy(v) for k, v in cnn.state_dict().items()})
    e, h = BLOCK["d_model"], BLOCK["heads"]
    tblock = tnn.TransformerEncoderLayer(e, h, BLOCK["ff"], dropout=0.0, activation="gelu", batch_first=True,
                                         norm_first=True)
    mask = tnn.Transformer.generate_square_subsequent_mask(BLOCK["seq"])

    def make(model, loss_fn):
        opt = torch.optim.SGD(model.parameters(), lr=LR)

        def step(x, y):
            opt.zero_grad()
            loss = loss_fn(model, torch.from_numpy(x), y)
            loss.backward()
            opt.step()
            return float(loss.detach())
        return step

    cnn_step = make(tcnn, lambda m, x, y: tnn.functional.cross_entropy(m(x), torch.from_numpy(y)))
    block_step = make(tblock, lambda m, x, g: (m(x, src_mask=mask, is_causal=True) * torch.from_numpy(g)).sum())
    return {"version": torch.__version__, "cnn": cnn_step, "block": block_step}


def run(time_interleaved, quick: bool) -> dict:
    """Time both steps (engine, hand-written, torch where installed); returns the results."""
    rng = np.random.default_rng(0)
    results = {}
    cnn = ConvBase(CNN_LENGTH, CLASSES)
    x = rng.standard_normal((CNN_BATCH, CNN_LENGTH)).astype(np.float32)
    y = rng.integers(0, CLASSES, CNN_BATCH)
    e = BLOCK["d_model"]
    block = dp.nn.TransformerBlock(e, BLOCK["heads"], BLOCK["ff"])
    xb = rng.standard_normal((BLOCK["batch"], BLOCK["seq"], e)).astype(np.float32)
    g = (rng.standard_normal(xb.shape) / (BLOCK["batch"] * BLOCK["seq"])).astype(np.float32)  # a per-token mean
    torch_steps = _torch_steps(cnn, block)
    cases = [("convbase_batch100", cnn, HandWrittenConvBase(cnn).step, lambda out, yy: F.cross_entropy(out, yy),
              x, y, 40 if quick else 400),
             ("transformer_block", block, HandWrittenBlock(block, BLOCK["heads"]).step,
              lambda out, gg: (out * gg).sum(), xb, g, 8 if quick else 80)]
    for name, model, hand, loss, xx, yy, repeats in cases:
        engine = EngineStep(model, loss).step
        np.testing.assert_allclose(engine(xx, yy), hand(xx, yy), rtol=1e-3)  # the same computation
        fns = {"hand": hand, "engine": engine}
        if torch_steps is not None:
            fns["torch"] = torch_steps["cnn" if name.startswith("conv") else "block"]
        t = time_interleaved(fns, xx, yy, repeats)
        res = {"hand_ms": 1e3 * t["hand"], "engine_ms": 1e3 * t["engine"], "ratio": t["engine"] / t["hand"],
               "target_ratio": 1.2, "params": model.num_parameters()}
        line = (f"{name:>18}: hand-written {res['hand_ms']:7.2f} ms | engine {res['engine_ms']:7.2f} ms | "
                f"ratio {res['ratio']:.3f} (target <= 1.2)")
        if "torch" in t:
            res.update(torch_ms=1e3 * t["torch"], torch_ratio=t["engine"] / t["torch"],
                       torch_version=torch_steps["version"])
            line += f" | torch eager {res['torch_ms']:.2f} ms (engine / torch {res['torch_ratio']:.2f})"
        results[name] = res
        print(line, flush=True)
    if torch_steps is None:
        print("(torch is not installed here: PyTorch eager not measured)", flush=True)
    return results
