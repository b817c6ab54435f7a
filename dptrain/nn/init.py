"""The default random generator of layer initialisation (torch.manual_seed's counterpart).

Layers built without an explicit `rng` draw their initial values from one module-level
numpy Generator. `manual_seed(seed)` replaces it, so the same builder called after the
same seed gives the same parameters: that is how the trainer's server and the
single-process loop start from identical models whatever the user's builder does.
"""

from __future__ import annotations

import numpy as np

_generator = np.random.default_rng()


def manual_seed(seed: int) -> np.random.Generator:
    """Reseed the default generator; returns it."""
    global _generator
    _generator = np.random.default_rng(seed)
    return _generator


def default_generator() -> np.random.Generator:
    return _generator


def uniform(rng, bound: float, shape, dtype):
    """U(-bound, bound) of `shape`, PyTorch's default for Linear and Conv weights and biases."""
    rng = _generator if rng is None else rng
    return rng.uniform(-bound, bound, shape).astype(dtype)
