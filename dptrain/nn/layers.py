"""Layers beyond Linear: convolution, pooling, normalization, dropout, embedding, attention.

Constructors, parameter names and default initialisations follow PyTorch's
(`Conv1d(in_channels, out_channels, kernel_size, stride=1, padding=0)`,
`weight`/`bias` in the state dict, ...), so a model reads the same in both. Every
layer takes `dtype` ("float32" or "float64") and `rng` (a numpy Generator; default:
`nn.init.default_generator()`, which `dp.manual_seed` reseeds).
"""

from __future__ import annotations

import math

import numpy as np

from ..tensor import Tensor, as_dtype
from . import functional as F
from . import init
from .module import Linear, Module, Parameter


class _ConvNd(Module):
    nd = 0

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, bias: bool = True,
                 dtype="float32", rng: np.random.Generator | None = None):
        super().__init__()
        name = type(self).__name__
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"{name}: channel counts must be positive, got ({in_channels}, {out_channels})")
        kernel = F._tuple(kernel_size, self.nd, f"{name}: kernel_size")
        self.stride = F._tuple(stride, self.nd, f"{name}: stride")
        self.padding = F._tuple(padding, self.nd, f"{name}: padding")
        if min(kernel) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ValueError(f"{name}: kernel_size and stride must be >= 1 and padding >= 0, got kernel "
                             f"{kernel}, stride {self.stride}, padding {self.padding}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel
        dt = as_dtype(dtype)
        # PyTorch's default: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias likewise
        bound = 1.0 / math.sqrt(in_channels * int(np.prod(kernel)))
        self.weight = Parameter(init.uniform(rng, bound, (out_channels, in_channels) + kernel, dt))
        self.bias = Parameter(init.uniform(rng, bound, (out_channels,), dt)) if bias else None

    def forward(self, x):
        return F.conv(x, self.weight, self.bias, self.stride, self.padding)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding})")


class Conv1d(_ConvNd):
    """(N, C_in, L) -> (N, C_out, L_out), L_out = (L + 2 padding - kernel) // stride + 1."""
    nd = 1


class Conv2d(_ConvNd):
    """(N, C_in, H, W) -> (N, C_out, H_out, W_out)."""
    nd = 2


class _Pool(Module):
    nd, kind = 0, ""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding

    def forward(self, x):
        return F._pool(x, self.nd, self.kernel_size, self.stride, self.padding, self.kind)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kernel_size={self.kernel_size}, stride={self.stride})"


class MaxPool1d(_Pool):
    nd, kind = 1, "max"


class MaxPool2d(_Pool):
    nd, kind = 2, "max"


class AvgPool1d(_Pool):
    nd, kind = 1, "avg"


class AvgPool2d(_Pool):
    nd, kind = 2, "avg"


class Flatten(Module):
    """Flattens axes start_dim..end_dim into one (by default all but the batch axis)."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x):
        shape = x.shape
        start = self.start_dim % len(shape)
        end = self.end_dim % len(shape)
        return x.reshape(shape[:start] + (math.prod(shape[start:end + 1]),) + shape[end + 1:])


class LayerNorm(Module):
    """Normalizes over the last axes (normalized_shape); weight ones, bias zeros, as PyTorch.
    `bias=False` (PyTorch 2.1+, nanoGPT's models) keeps the weight and drops the bias."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 dtype="float32"):
        super().__init__()
        shape = tuple(normalized_shape) if isinstance(normalized_shape, (tuple, list)) else (int(normalized_shape),)
        self.normalized_shape, self.eps = shape, eps
        dt = as_dtype(dtype)
        self.weight = Parameter(np.ones(shape, dt)) if elementwise_affine else None
        self.bias = Parameter(np.zeros(shape, dt)) if elementwise_affine and bias else None

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def __repr__(self) -> str:
        return f"LayerNorm({self.normalized_shape})"


class Dropout(Module):
    """Inverted dropout with probability p, on in train() mode, off in eval() mode.

    `random_key` (set from the layer's name in the model when a trainer builds it)
    makes its masks a pure function of (seed, step, example position, layer).
    """

    def __init__(self, p: float = 0.5):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = p
        self.random_key = 0

    def forward(self, x):
        return F.dropout(x, self.p, self.training, self.random_key)

    def __repr__(self) -> str:
        return f"Dropout(p={self.p})"


class Embedding(Module):
    """Rows of weight (num_embeddings, embedding_dim) by integer index; weight N(0, 1) as PyTorch."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype="float32",
                 rng: np.random.Generator | None = None):
        super().__init__()
        if num_embeddings < 1 or embedding_dim < 1:
            raise ValueError(f"Embedding: sizes must be positive, got ({num_embeddings}, {embedding_dim})")
        rng = init.default_generator() if rng is None else rng
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter(rng.standard_normal((num_embeddings, embedding_dim)).astype(as_dtype(dtype)))

    def forward(self, indices):
        return F.embedding(indices, self.weight)

    def __repr__(self) -> str:
        return f"Embedding({self.num_embeddings}, {self.embedding_dim})"


class GELU(Module):
    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(x, self.approximate)


class MultiheadSelfAttention(Module):
    """Multi-head self-attention over (batch, T, embed_dim), causal by default.

    Parameters as PyTorch's MultiheadAttention: `in_proj_weight` (3E, E) Xavier-uniform,
    `in_proj_bias` zeros, `out_proj` a Linear whose bias starts at zero. `dropout` drops
    attention weights in train() mode (as MultiheadAttention's, and nanoGPT's attn_dropout);
    `random_key` keys its masks as Dropout's.
    """

    def __init__(self, embed_dim: int, num_heads: int, causal: bool = True, bias: bool = True, dtype="float32",
                 rng: np.random.Generator | None = None, dropout: float = 0.0):
        super().__init__()
        if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"MultiheadSelfAttention: embed_dim {embed_dim} must be a positive multiple of "
                             f"num_heads {num_heads}")
        if not 0 <= dropout < 1:
            raise ValueError(f"MultiheadSelfAttention: dropout must be in [0, 1), got {dropout}")
        self.dropout, self.random_key = dropout, 0
        dt = as_dtype(dtype)
        self.embed_dim, self.num_heads, self.causal = embed_dim, num_heads, causal
        bound = math.sqrt(6.0 / (embed_dim + 3 * embed_dim))  # xavier_uniform_ on (3E, E)
        self.in_proj_weight = Parameter(init.uniform(rng, bound, (3 * embed_dim, embed_dim), dt))
        self.in_proj_bias = Parameter(np.zeros(3 * embed_dim, dt)) if bias else None
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias, dtype=dtype, rng=rng)
        if bias:
            self.out_proj.bias.data[...] = 0

    def forward(self, x):
        if x.ndim != 3 or x.shape[2] != self.embed_dim:
            raise ValueError(f"MultiheadSelfAttention: input must be (batch, T, {self.embed_dim}), got {x.shape}")
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        return self.out_proj(F.self_attention(qkv, self.num_heads, self.causal, self.dropout, self.training,
                                              self.random_key))

    def __repr__(self) -> str:
        return f"MultiheadSelfAttention({self.embed_dim}, num_heads={self.num_heads}, causal={self.causal})"


class TransformerBlock(Module):
    """A pre-norm transformer block: x + attn(norm1(x)), then + linear2(gelu(linear1(norm2(x)))).

    Names as PyTorch's TransformerEncoderLayer(norm_first=True): self_attn, linear1,
    linear2, norm1, norm2; `dropout` applies to the attention weights, after attention and after
    the MLP (as there); `bias=False`
    leaves out every bias (the norms' too), as nanoGPT's blocks.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int | None = None, dropout: float = 0.0,
                 causal: bool = True, dtype="float32", rng: np.random.Generator | None = None, bias: bool = True):
        super().__init__()
        ff = 4 * d_model if dim_feedforward is None else dim_feedforward
        self.norm1 = LayerNorm(d_model, dtype=dtype, bias=bias)
        self.self_attn = MultiheadSelfAttention(d_model, nhead, causal=causal, bias=bias, dtype=dtype, rng=rng,
                                                dropout=dropout)
        self.dropout1 = Dropout(dropout)
        self.norm2 = LayerNorm(d_model, dtype=dtype, bias=bias)
        self.linear1 = Linear(d_model, ff, bias=bias, dtype=dtype, rng=rng)
        self.activation = GELU()
        self.linear2 = Linear(ff, d_model, bias=bias, dtype=dtype, rng=rng)
        self.dropout2 = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.dropout1(self.self_attn(self.norm1(x)))
        return x + self.dropout2(self.linear2(self.activation(self.linear1(self.norm2(x)))))
