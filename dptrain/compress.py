"""Compressed gradients: what a worker sends, in fewer bytes (`--compress`).

Parameters always travel exact; only the gradients workers send are compressed:

- `fp16`: each entry as an IEEE half (2 bytes; numpy's float16, round to nearest).
- `bf16`: each entry as a bfloat16 (2 bytes: a float32's upper half, rounded to nearest
  even; float32's range, 8 bits of precision).
- `topk:RATIO`: the ceil(RATIO x size) entries of largest magnitude, as values and int32
  positions, with error feedback (Stich et al. 2018; Lin et al. 2018): the worker keeps
  what it did not send as a residual and adds it to its next gradient, so every part of
  every gradient is sent eventually. Exactly: sent + kept = gradient + old residual.

A payload is a byte buffer (a uint8 array, or the first bytes of a worker's shared-memory
gradient segment) plus a small `meta` dict that travels beside the step's metrics; the
server adds each decoded payload into one dense buffer in rank order (`decode_add`).

Where gradients travel, a `Codec` is always present (`codec`): `Dense` (no --compress) is
the identity, sending the gradient itself; `Encoded` wraps one of the compressors above.
The worker's side `encode`s, the side where gradients meet turns the payloads of a step
into the addends of its mean gradient (`addends`, rank order): the gradients themselves,
or their decoded sum. Nothing else in the step's path asks whether gradients are compressed.
"""

from __future__ import annotations

import math

import numpy as np

KINDS = ("none", "fp16", "bf16", "topk:RATIO")


def parse(text: str | None) -> tuple:
    """"none" -> ("none", None); "fp16", "bf16"; "topk:0.01" -> ("topk", 0.01). ValueError naming
    the value otherwise."""
    text = "none" if text is None else str(text)
    if text in ("none", "fp16", "bf16"):
        return text, None
    kind, sep, ratio = text.partition(":")
    try:
        r = float(ratio)
    except ValueError:
        r = None
    if kind != "topk" or not sep or r is None or not 0 < r <= 0.5:
        raise ValueError(f"{text!r} (expected none, fp16, bf16 or topk:RATIO with 0 < RATIO <= 0.5, e.g. topk:0.01)")
    return "topk", r


def make(text: str | None, size: int, dtype) -> "Compressor | None":
    """The compressor of a `--compress` setting for gradients of `size` entries of `dtype`;
    None for "none"."""
    kind, ratio = parse(text)
    if kind == "none":
        return None
    return {"fp16": Half, "bf16": BFloat16, "topk": TopK}[kind](size, np.dtype(dtype), ratio)


class Compressor:
    """Encodes a dense gradient into bytes and adds decoded bytes into a dense buffer."""

    def __init__(self, size: int, dtype: np.dtype, ratio: float | None = None):
        self.size, self.dtype, self.ratio = size, dtype, ratio

    @property
    def max_bytes(self) -> int:
        """The largest payload (what a buffer for it needs)."""
        raise NotImplementedError

    def encode(self, grad: np.ndarray, into: np.ndarray) -> dict:
        """Write `grad`'s payload into the byte buffer `into` (uint8, at least max_bytes); its meta
        (with "bytes", the payload's length)."""
        raise NotImplementedError

    def decode_add(self, payload: np.ndarray, meta: dict, out: np.ndarray) -> None:
        """out += the gradient the payload (any array whose bytes begin with it) encodes."""
        raise NotImplementedError


class Half(Compressor):
    @property
    def max_bytes(self) -> int:
        return 2 * self.size

    def encode(self, grad, into):
        np.copyto(into[:2 * self.size].view(np.float16), grad, casting="same_kind")
        return {"bytes": 2 * self.size}

    def decode_add(self, payload, meta, out):
        out += _bytes(payload)[:2 * self.size].view(np.float16)


class BFloat16(Compressor):
    @property
    def max_bytes(self) -> int:
        return 2 * self.size

    def encode(self, grad, into):
        bits = np.ascontiguousarray(grad, dtype=np.float32).view(np.uint32)
        # round to nearest even on the upper 16 bits (NaN and Inf keep their class)
        rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
        into[:2 * self.size].view(np.uint16)[:] = rounded.astype(np.uint16)
        return {"bytes": 2 * self.size}

    def decode_add(self, payload, meta, out):
        halves = _bytes(payload)[:2 * self.size].view(np.uint16)
        out += (halves.astype(np.uint32) << np.uint32(16)).view(np.float32)


class TopK(Compressor):
    """The largest-magnitude entries of gradient + residual; the rest kept as the residual."""

    def __init__(self, size, dtype, ratio):
        super().__init__(size, dtype, ratio)
        self.k = min(size, max(1, math.ceil(ratio * size)))
        self.residual = np.zeros(size, dtype)

    @property
    def max_bytes(self) -> int:
        return self.k * (self.dtype.itemsize + 4)

    def encode(self, grad, into):
        acc = self.residual
        acc += grad  # gradient + old residual, in place: what is not sent stays here
        k, item = self.k, self.dtype.itemsize
        picked = np.argpartition(np.abs(acc), self.size - k)[self.size - k:] if k < self.size else np.arange(k)
        picked.sort()  # in order: the server's adds walk memory forwards
        values = into[:k * item].view(self.dtype)
        np.take(acc, picked, out=values)
        into[k * item:k * (item + 4)].view(np.int32)[:] = picked
        acc[picked] = 0  # sent: no longer owed
        return {"bytes": k * (item + 4), "k": k}

    def decode_add(self, payload, meta, out):
        k, item = meta["k"], self.dtype.itemsize
        raw = _bytes(payload)
        out[raw[k * item:k * (item + 4)].view(np.int32)] += raw[:k * item].view(self.dtype)


class Codec:
    """The payload path of gradients of `size` entries of `dtype` (see the module's docstring)."""

    def __init__(self, size: int, dtype):
        self.size, self.dtype = size, np.dtype(dtype)

    writes_in_place = False  # whether the gradient itself is the payload (backward may write it where it goes)

    def encode(self, grad: np.ndarray, into: np.ndarray | None = None) -> tuple[np.ndarray, dict | None]:
        """(payload, meta) of the gradient `grad` (numpy); the payload is written into the byte
        buffer `into` if given (a shared-memory segment), else into the codec's own."""
        raise NotImplementedError

    def addends(self, payloads: list, metas: list) -> list:
        """What `step.mean_gradient` adds up, in rank order, for these payloads (rank order)."""
        raise NotImplementedError

    def ranges(self, bounds: list) -> list:
        """A codec of the same kind for each range [(lo, hi)] of the gradient (sharded servers: each
        shard's range travels, and is decoded, on its own)."""
        return [codec(self.setting, hi - lo, self.dtype) for lo, hi in bounds]

    setting = "none"


class Dense(Codec):
    """No compression: the payload is the gradient (a view, never a copy)."""

    writes_in_place = True

    @property
    def max_bytes(self) -> int:
        return self.size * self.dtype.itemsize

    def encode(self, grad, into=None):
        return grad, None

    def addends(self, payloads, metas):
        return list(payloads)


class Encoded(Codec):
    """A compressor's payloads: encoded by workers, their sum decoded where they meet."""

    def __init__(self, setting: str, size: int, dtype):
        super().__init__(size, dtype)
        self.setting = setting
        self.compressor = make(setting, size, dtype)
        self.max_bytes = self.compressor.max_bytes
        self._buffer = None  # the worker's payload buffer, made on first use
        self._dense = None  # where the server adds decoded payloads up, made on first use

    def encode(self, grad, into=None):
        if into is None:
            if self._buffer is None:
                self._buffer = np.empty(self.max_bytes, np.uint8)
            into = self._buffer
        meta = self.compressor.encode(grad, into)
        return into[:meta["bytes"]], meta

    def addends(self, payloads, metas):
        if self._dense is None:
            self._dense = np.zeros(self.size, self.dtype)
        return [decode_sum(self.compressor, payloads, metas, self._dense)]


def codec(setting: str | None, size: int, dtype) -> Codec:
    """The codec of a `--compress` setting for gradients of `size` entries of `dtype`."""
    return Dense(size, dtype) if parse(setting)[0] == "none" else Encoded(str(setting), size, dtype)


def decode_sum(decoder: Compressor, payloads: list, metas: list, out: np.ndarray) -> np.ndarray:
    """out = the sum of the gradients the payloads encode, added in their order (rank order)."""
    out[...] = 0
    for payload, meta in zip(payloads, metas):
        decoder.decode_add(payload, meta, out)
    return out


def _bytes(payload: np.ndarray) -> np.ndarray:
    return payload.reshape(-1).view(np.uint8)
