"""QuantConfig: every knob of the quantizer, validated in one place."""
from __future__ import annotations

import dataclasses
import math

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Settings for :func:`eqcore.quantize`.

    bits        code width: 2, 3, 4 or 8.
    sigma       outlier threshold n: entries with |W - mean| >= n * std stay in full
                precision. ``None`` disables outlier isolation.
    outlier_stats  "tensor" (mean/std of the whole matrix, the paper) or "row".
    group_size  scales per group of this many input columns; ``None`` = one per row.
    steps       Adam iterations on each scale (0 = keep the max-abs initial scale).
    lr          Adam learning rate on the *relative* scale u = s / s0 (magnitude-free).
    betas, eps  Adam hyper-parameters (eps acts on the normalized gradient).
    """

    bits: int = 4
    sigma: float | None = 3.0
    outlier_stats: str = "tensor"
    group_size: int | None = None
    steps: int = 500
    lr: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits!r}")
        if self.sigma is not None and not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be a positive finite number or None, got {self.sigma!r}")
        if self.outlier_stats not in ("tensor", "row"):
            raise ValueError(f"outlier_stats must be 'tensor' or 'row', got {self.outlier_stats!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size must be a positive int or None, got {self.group_size!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {self.steps!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be positive and finite, got {self.lr!r}")
        b1, b2 = self.betas
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas!r}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be positive and finite, got {self.eps!r}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def replace(self, **changes) -> "QuantConfig":
        return dataclasses.replace(self, **changes)
