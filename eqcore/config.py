"""QuantConfig: every knob of the quantizer, validated in one place."""
from __future__ import annotations

import dataclasses
import math

from .layout import SUPPORTED_BITS, check_bits, qrange
from .solvers import SOLVERS


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Settings for :func:`eqcore.quantize`.

    bits        code width: 2, 3, 4 or 8.
    sigma       outlier threshold n: entries with |W - mean| >= n * std stay in full
                precision. ``None`` disables outlier isolation.
    outlier_stats  "tensor" (mean/std of the whole matrix, the paper) or "row".
    group_size  scales per group of this many input columns; ``None`` = one per row.
    solver      how scales are chosen: a name in :data:`eqcore.solvers.SOLVERS` ("adam", the paper's).
    steps       Adam iterations on each scale (0 = keep the max-abs initial scale).
    lr          Adam learning rate on the *relative* scale u = s / s0 (magnitude-free).
    betas, eps  Adam hyper-parameters (eps acts on the normalized gradient).
    """

    bits: int = 4
    sigma: float | None = 3.0
    outlier_stats: str = "tensor"
    group_size: int | None = None
    solver: str = "adam"
    steps: int = 500
    lr: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        check_bits(self.bits)
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {tuple(SOLVERS)}, got {self.solver!r}")
        if self.sigma is not None and not (_real(self.sigma) and math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be a positive finite number or None, got {self.sigma!r}")
        if self.outlier_stats not in ("tensor", "row"):
            raise ValueError(f"outlier_stats must be 'tensor' or 'row', got {self.outlier_stats!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size must be a positive int or None, got {self.group_size!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {self.steps!r}")
        if not (_real(self.lr) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be positive and finite, got {self.lr!r}")
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2 and all(map(_real, self.betas))
                and all(0 <= b < 1 for b in self.betas)):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas!r}")
        if not (_real(self.eps) and math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be positive and finite, got {self.eps!r}")

    @property
    def qmin(self) -> int:
        return qrange(self.bits)[0]

    @property
    def qmax(self) -> int:
        return qrange(self.bits)[1]

    def replace(self, **changes) -> "QuantConfig":
        return dataclasses.replace(self, **changes)


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
