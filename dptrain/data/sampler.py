"""The seeded sampler: which examples every step uses, and how they split over workers.

Every process computes the same answer from (seed, step) alone, so the driver
never ships indices or data per step.
"""

from __future__ import annotations

import numpy as np


def shard_bounds(batch_size: int, num_shards: int, rank: int) -> tuple[int, int]:
    """[start, stop) of shard `rank` when `batch_size` items split into `num_shards`
    contiguous shards whose sizes differ by at most one (larger shards first)."""
    if not 0 <= rank < num_shards:
        raise ValueError(f"shard rank {rank} out of range for {num_shards} shards")
    base, extra = divmod(batch_size, num_shards)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


LARGE = 1 << 22  # examples beyond which an epoch's order is computed per batch, not held whole


class IndexPermutation:
    """A seeded permutation of [0, n) evaluated at the positions asked for, in O(batch) memory: a
    4-round Feistel network on the smallest even number of bits that covers n, cycle-walked back
    into [0, n) (each position maps to a distinct index; a step of a stream of 10^10 windows needs
    no 80 GB array). The BatchSampler's order for datasets of more than LARGE examples."""

    ROUNDS = 4

    def __init__(self, n: int, key):
        self.n = int(n)
        self.half = max(1, ((self.n - 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = np.random.default_rng(key).integers(0, 2**63, self.ROUNDS, dtype=np.uint64)

    def _round(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half)
        left, right = x >> shift, x & self.mask
        for k in self.keys:  # (L, R) -> (R, L ^ F(R)): a bijection whatever F is
            f = (right ^ k) * np.uint64(0x9E3779B97F4A7C15)
            f ^= f >> np.uint64(29)
            left, right = right, left ^ (f & self.mask)
        return (left << shift) | right

    def __getitem__(self, positions) -> np.ndarray:
        x = self._round(np.asarray(positions, dtype=np.uint64))
        out = x >= self.n
        while out.any():  # the network permutes [0, 4^half), at most 4n: a few walks at most
            x[out] = self._round(x[out])
            out = x >= self.n
        return x.astype(np.int64)


class BatchSampler:
    """Global batches of `batch_size` indices into `num_examples`, a fresh permutation per epoch.

    Step s belongs to epoch s // steps_per_epoch. Each epoch covers every example
    once; its last batch is smaller when batch_size does not divide num_examples.
    Up to LARGE examples the permutation is numpy's (held per epoch); beyond, an
    IndexPermutation computes each batch's indices alone.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int = 0):
        if num_examples < 1:
            raise ValueError(f"the sampler needs at least one example, got {num_examples}")
        if batch_size < 1:
            raise ValueError(f"invalid batch size: {batch_size}")
        self.num_examples = num_examples
        self.batch_size = min(batch_size, num_examples)
        self.seed = seed
        self.steps_per_epoch = -(-num_examples // self.batch_size)
        self._epoch, self._perm = None, None

    def permutation(self, epoch: int):
        """The epoch's order: an array, or an IndexPermutation beyond LARGE examples."""
        if epoch != self._epoch:
            self._perm = (IndexPermutation(self.num_examples, [self.seed, epoch]) if self.num_examples > LARGE else
                          np.random.default_rng([self.seed, epoch]).permutation(self.num_examples))
            self._epoch = epoch
        return self._perm

    def indices(self, step: int) -> np.ndarray:
        """The example indices of global step `step` (counted from 0 over all epochs)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        start = i * self.batch_size
        order = self.permutation(epoch)
        if isinstance(order, IndexPermutation):
            return order[np.arange(start, min(start + self.batch_size, self.num_examples))]
        return order[start:start + self.batch_size]

    def shard(self, step: int, num_shards: int, rank: int) -> np.ndarray:
        """Worker `rank`'s contiguous slice of the step's global batch."""
        return self.shard_at(step, num_shards, rank)[0]

    def shard_at(self, step: int, num_shards: int, rank: int) -> tuple[np.ndarray, int]:
        """Worker `rank`'s slice of the step's global batch and the position in the batch where it
        starts (what per-example randomness, dropout's, is keyed by)."""
        idx = self.indices(step)
        start, stop = shard_bounds(len(idx), num_shards, rank)
        return idx[start:stop], start
