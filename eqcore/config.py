"""QuantConfig: every knob of the quantizer, validated in one place."""
from __future__ import annotations

import dataclasses
import math

from .grids import CODEBOOKS
from .layout import GRIDS, SCALE_DTYPES, check_bits, qrange
from .outliers import SELECTORS
from .solvers import DEFAULT as DEFAULT_SOLVER
from .solvers import GRIDS as SOLVER_GRIDS
from .solvers import SOLVERS


PAPER = {"outlier_stats": "tensor", "scale_dtype": "float32", "solver": "adam"}  # EasyQuant as published


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Settings for :func:`eqcore.quantize`.

    bits        code width: 2, 3, 4 or 8.
    outliers    how outliers (kept exact) are chosen, see :mod:`eqcore.outliers`: "sigma" (the
                paper's), "adpq" (robust per-group threshold) or "budget" (error-driven).
    sigma       threshold n of "sigma" (|W - mean| >= n * std) and "adpq" (in robust std units).
                ``None`` disables outlier isolation.
    outlier_stats  "row" (mean/std of each row, the default) or "tensor" (of the whole matrix,
                the paper's), for "sigma".
    outlier_fraction  the share of entries "budget" keeps exact (e.g. 0.005).
    group_size  scales per group of this many input columns; ``None`` = one per row.
    scale_dtype "float16" (the default), "bfloat16" or "float32" (the paper's): how scales (and
                zeros, column scales) are stored. Narrower ones are the float32 result rounded to
                nearest (codes follow). "log8": a uint8 code per group, s = row scale * 2^(-q/32)
                under a float16 scale per row (a 1.1% step; zeros and column scales float16):
                half the cost of float16 group scales, for grouped layouts.
    grid        the levels a code stands for: "symmetric" (integers around 0, the paper's),
                "asymmetric" (integers minus a zero-point per group) or "codebook" (2^bits
                fitted or normal-float levels), see :mod:`eqcore.grids`.
    codebook    for the codebook grid: "fit" (levels fitted to the tensor) or "nf" (normal-float).
    col_scales  also a scale per input column, before the row / group grid (SINQ-like balancing).
    solver      how the grid's parameters are chosen: a name in :data:`eqcore.solvers.SOLVERS`;
                None = the grid's default (:attr:`solver_name`: "exact" for the symmetric grid,
                or "adam" when steps=0, i.e. max-abs scales; "lloyd" for the others).
    steps       Adam iterations on each scale (0 = keep the max-abs initial scale: RTN).
    lr          Adam learning rate on the *relative* scale u = s / s0 (magnitude-free).
    betas, eps  Adam hyper-parameters (eps acts on the normalized gradient).

    Defaults (chosen on the tune split, bench/results/frontier_tune.md): per-row outlier
    statistics, fp16 scales and the exact solver; :meth:`paper` gives the paper's settings.
    """

    bits: int = 4
    outliers: str = "sigma"
    sigma: float | None = 3.0
    outlier_stats: str = "row"
    outlier_fraction: float = 0.005
    group_size: int | None = None
    scale_dtype: str = "float16"
    grid: str = "symmetric"
    codebook: str = "fit"
    col_scales: bool = False
    solver: str | None = None
    steps: int = 500
    lr: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        check_bits(self.bits)
        if self.grid not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {self.grid!r}")
        if self.codebook not in CODEBOOKS:
            raise ValueError(f"codebook must be one of {CODEBOOKS}, got {self.codebook!r}")
        if not isinstance(self.col_scales, bool):
            raise ValueError(f"col_scales must be True or False, got {self.col_scales!r}")
        if self.solver is not None and self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {tuple(SOLVERS)}, got {self.solver!r}")
        if self.grid not in SOLVER_GRIDS[self.solver_name]:
            raise ValueError(f"solver {self.solver!r} handles the {'/'.join(SOLVER_GRIDS[self.solver_name])} grid, "
                             f"not {self.grid!r} (use solver='lloyd', or leave solver unset)")
        if self.sigma is not None and not (_real(self.sigma) and math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be a positive finite number or None, got {self.sigma!r}")
        if self.outlier_stats not in ("tensor", "row"):
            raise ValueError(f"outlier_stats must be 'tensor' or 'row', got {self.outlier_stats!r}")
        if self.outliers not in SELECTORS:
            raise ValueError(f"outliers must be one of {SELECTORS}, got {self.outliers!r}")
        if not (_real(self.outlier_fraction) and 0 <= self.outlier_fraction < 0.5):
            raise ValueError(f"outlier_fraction must lie in [0, 0.5), got {self.outlier_fraction!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {tuple(SCALE_DTYPES)}, got {self.scale_dtype!r}")
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

    def describe(self) -> str:
        """The settings in one line, e.g. "4-bit symmetric, sigma=3.0 (tensor), per row, adam 500 steps"."""
        grid = self.grid + (f" ({self.codebook})" if self.grid == "codebook" else "")
        grid += " + column scales" if self.col_scales else ""
        if self.sigma is None and self.outliers != "budget":
            out = "no outliers"
        elif self.outliers == "budget":
            out = f"outlier budget {self.outlier_fraction:g}"
        else:
            out = f"{self.outliers} {self.sigma:g}" + (f" ({self.outlier_stats})" if self.outliers == "sigma" else "")
        groups = "per row" if self.group_size is None else f"group {self.group_size}"
        solver = self.solver_name + (f" {self.steps} steps, lr {self.lr:g}" if self.solver_name == "adam" else "")
        scales = "" if self.scale_dtype == "float32" else f", {self.scale_dtype} scales"
        return f"{self.bits}-bit {grid}, {out}, {groups}, {solver}{scales}"

    @classmethod
    def paper(cls, **options) -> "QuantConfig":
        """The paper's settings (per-tensor outlier statistics, fp32 scales, Adam), plus ``options``."""
        return cls(**{**PAPER, **options})

    @property
    def solver_name(self) -> str:
        """The solver that runs: ``solver``, or the grid's default when it is None (with steps=0,
        the symmetric grid keeps its max-abs scales: Adam for no steps)."""
        if self.solver is not None:
            return self.solver
        return "adam" if self.grid == "symmetric" and self.steps == 0 else DEFAULT_SOLVER[self.grid]

    @property
    def rows_independent(self) -> bool:
        """True when each row's result depends on that row alone, so blocks of rows may be
        quantized apart and stacked: no tensor-wide outlier statistics or budget, no fitted
        codebook, no column scales."""
        tensor_outliers = self.outliers == "budget" or (self.outliers == "sigma" and self.outlier_stats == "tensor")
        return not (tensor_outliers or self.col_scales or (self.grid == "codebook" and self.codebook == "fit"))

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
