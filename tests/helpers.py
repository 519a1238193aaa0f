"""Test data: realistic heavy-tailed weight matrices; the matmul tolerance."""
import numpy as np


def weights(rows, cols, seed=0, dtype=np.float32, scale=0.02, zero_rows=0):
    """Student-t(4) weights like an LLM's: a few entries far out in the tails;
    the first ``zero_rows`` rows all zero."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(4, size=(rows, cols)) * scale).astype(dtype)
    w[:zero_rows] = 0
    return w


def assert_matmul_close(y, x, qt):
    """The matmul contract against the NumPy reference's W = dequantize(qt, float32), in float64:
    |y - x @ W^T| <= 1e-5 * (|x| @ |W|^T) + 1e-30 (float32 sums in another order)."""
    from eqcore.backends.numpy import dequantize

    W = dequantize(qt, np.float32).astype(np.float64)
    x64 = np.asarray(x).reshape(-1, qt.shape[1]).astype(np.float64)
    exact = x64 @ W.T
    bound = 1e-5 * (np.abs(x64) @ np.abs(W).T) + 1e-30
    np.testing.assert_array_less(np.abs(np.asarray(y).reshape(exact.shape).astype(np.float64) - exact), bound)


def run_ptxas(exe, cc, text, name, timeout=300):
    """Assemble PTX ``text`` for compute capability ``cc`` with ``ptxas -v``; the CompletedProcess."""
    import os
    import subprocess

    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"{name}_{os.getpid()}.ptx")
    with open(path, "w") as f:
        f.write(text)
    try:
        return subprocess.run([exe, f"-arch=sm_{cc[0]}{cc[1]}", "-v", path, "-o", os.devnull],
                              capture_output=True, text=True, timeout=timeout, check=False)
    finally:
        os.unlink(path)
