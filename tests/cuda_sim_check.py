"""Run eqcore.cuda_scales on the Numba CUDA simulator against the NumPy reference.

Run as a script (the simulator must be enabled before numba.cuda is imported):
    python tests/cuda_sim_check.py
Prints one line per case and exits non-zero on the first mismatch.
"""
import os
import sys
import time

os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from eqcore.config import QuantConfig  # noqa: E402
from eqcore.cuda_scales import SIMULATOR, launch_config, optimize_scales_cuda  # noqa: E402
from eqcore.scales import optimize_scales_reference, reconstruction_loss  # noqa: E402

# (rows, cols, bits, group_size, steps): one-warp and multi-warp blocks, non-divisor
# groups (ragged last group), per-row scales, zero rows, steps 0.
CASES = [
    (3, 40, 4, None, 12),
    (2, 70, 3, 32, 15),
    (3, 40, 2, 16, 20),
    (2, 70, 8, None, 8),
    (2, 40, 4, 13, 0),
    (2, 300, 4, None, 6),  # 128 threads: 4 warps, cross-warp reduction
    (2, 30, 8, 7, 5),
]


def make(rows, cols, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    x[rng.random((rows, cols)) < 0.05] = 0.0  # zeroed outliers
    x[0] = 0.0  # an all-zero row
    return x


def main() -> int:
    assert SIMULATOR, "NUMBA_ENABLE_CUDASIM was not honoured"
    t0 = time.time()
    for i, (rows, cols, bits, group, steps) in enumerate(CASES):
        cfg = QuantConfig(bits=bits, group_size=group, steps=steps, lr=5e-3)
        x = make(rows, cols, i)
        got = optimize_scales_cuda(x, cfg)
        ref = optimize_scales_reference(x, cfg)
        g = cols if group is None else min(group, cols)
        ok = got.dtype == np.float32 and got.shape == ref.shape and np.array_equal(got, ref)
        lg = reconstruction_loss(x, got, cfg).sum()
        lr_ = reconstruction_loss(x, ref, cfg).sum()
        print(f"{rows}x{cols} bits={bits} group={group} steps={steps} threads={launch_config(g)[0]}: "
              f"{'exact' if ok else 'MISMATCH'} loss gpu={lg:.6e} ref={lr_:.6e}")
        if not ok:
            print("got", got, "\nref", ref)
            return 1
    print(f"all {len(CASES)} cases exact in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
