"""Datasets, user data files and the seeded batch sampler."""

from .datasets import (BUILTIN, TASKS, Dataset, DataError, digits, holdout_split, load_csv, load_dataset,
                       load_npz, mnist1d, moons, regression, spirals, synthetic)
from .sampler import BatchSampler, shard_bounds

__all__ = ["BUILTIN", "TASKS", "Dataset", "DataError", "digits", "holdout_split", "load_csv", "load_dataset",
           "load_npz", "mnist1d", "moons", "regression", "spirals", "synthetic", "BatchSampler", "shard_bounds"]
