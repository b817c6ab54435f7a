"""Datasets, user data files and the seeded batch sampler."""

from .datasets import (BUILTIN, SORT_LENGTH, SORT_VALUES, TASKS, Dataset, DataError, digits, digits2d, holdout_split, load_csv, load_dataset,
                       load_npz, load_text, mnist1d, moons, regression, sort_task, spirals, synthetic)
from .sampler import BatchSampler, shard_bounds

__all__ = ["BUILTIN", "SORT_LENGTH", "SORT_VALUES", "TASKS", "Dataset", "DataError", "digits", "digits2d", "holdout_split", "load_csv",
           "load_dataset", "load_npz", "load_text", "mnist1d", "moons", "regression", "sort_task", "spirals",
           "synthetic", "BatchSampler", "shard_bounds"]
