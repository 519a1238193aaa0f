"""Test data: realistic heavy-tailed weight matrices."""
import numpy as np


def weights(rows, cols, seed=0, dtype=np.float32, scale=0.02, zero_rows=0):
    """Student-t(4) weights like an LLM's: a few entries far out in the tails;
    the first ``zero_rows`` rows all zero."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(4, size=(rows, cols)) * scale).astype(dtype)
    w[:zero_rows] = 0
    return w
