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


class BatchSampler:
    """Global batches of `batch_size` indices into `num_examples`, a fresh permutation per epoch.

    Step s belongs to epoch s // steps_per_epoch. Each epoch covers every example
    once; its last batch is smaller when batch_size does not divide num_examples.
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

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            self._epoch = epoch
        return self._perm

    def indices(self, step: int) -> np.ndarray:
        """The example indices of global step `step` (counted from 0 over all epochs)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        start = i * self.batch_size
        return self.permutation(epoch)[start:start + self.batch_size]

    def shard(self, step: int, num_shards: int, rank: int) -> np.ndarray:
        """Worker `rank`'s contiguous slice of the step's global batch."""
        return self.shard_at(step, num_shards, rank)[0]

    def shard_at(self, step: int, num_shards: int, rank: int) -> tuple[np.ndarray, int]:
        """Worker `rank`'s slice of the step's global batch and the position in the batch where it
        starts (what per-example randomness, dropout's, is keyed by)."""
        idx = self.indices(step)
        start, stop = shard_bounds(len(idx), num_shards, rank)
        return idx[start:stop], start
