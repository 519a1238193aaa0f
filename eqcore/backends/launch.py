"""Launch plans for the CUDA C kernels of ``raw_kernels/``: names, geometry, checked arguments.

Plain Python, importable without a GPU: :mod:`eqcore.backends.cupy` runs the plans with CuPy,
``tests/test_raw_kernels_host.py`` runs the same plans on the host with the kernels compiled
by g++. The launch geometry is defined here and handed to the .cu files as -D defines.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..dtypes import bfloat16
from ..interop import array_module
from ..layout import BLOCK, GRIDS, INDEX_DTYPES, SUPPORTED_BITS, check_bits, group_layout, packed_cols
from ..outliers import check_csr

THREADS = 256      # threads per block: encode, pack, unpack (one packing block per thread)
DQ_THREADS = 128   # threads per block: dequant (one packing block per thread)
DQ_TILE = DQ_THREADS * BLOCK  # codes of one row per dequant block
GV_WARPS = 4       # most warps per GEMV block; they split a row's columns (the launch uses as many as it fills)
GV_ROWS = 4        # output rows per GEMV block (4 a warp measured best on an H200 in the one-warp-per-rows layout
                   # of 2026-11-29, bench/results/gpu_geometry.md; the column split is not measured yet)
GEMV_BATCHES = (1, 4, 8)  # GEMV instantiations (NB); a batch runs on the smallest NB >= batch

# weight dtype -> CUDA type; the index is the `vtype` code of load_val() in eqcore.cuh
CUDA_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double"}
VTYPE = {name: i for i, name in enumerate(CUDA_TYPES)}
INDEX_TYPES = dict(zip(INDEX_DTYPES, ("unsigned short", "int")))


def cuda_defines() -> list[str]:
    return [f"-DEQ_THREADS={THREADS}", f"-DEQ_DQ_THREADS={DQ_THREADS}", f"-DEQ_GV_WARPS={GV_WARPS}",
            f"-DEQ_GV_ROWS={GV_ROWS}"]


# -- kernel names (NVRTC name expressions) and the file that defines each ------------------
def encode_name(bits: int, grid: str = "symmetric") -> str:
    return f"eq::encode<{bits}, {GRIDS.index(grid)}>"


DIVIDE_COLS = "eq::divide_cols"


def pack_name(bits: int) -> str:
    return f"eq::pack<{bits}>"


def unpack_name(bits: int) -> str:
    return f"eq::unpack<{bits}>"


def dequant_name(bits: int, out: str, index: str, grid: str = "symmetric") -> str:
    return f"eq::dequant<{bits}, {GRIDS.index(grid)}, {CUDA_TYPES[out]}, {INDEX_TYPES[index]}>"


def gemv_name(bits: int, nb: int, grid: str = "symmetric") -> str:
    return f"eq::gemv<{bits}, {GRIDS.index(grid)}, {nb}>"


def source_of(name: str) -> str:
    """The raw_kernels/ file that defines kernel ``name``."""
    return {"eq::dequant<": "dequant.cu", "eq::gemv<": "matmul.cu"}.get(name[:name.find("<") + 1], "codec.cu")


def all_names() -> list[str]:
    """Every instantiation the library can launch."""
    names = [encode_name(b, g) for b in SUPPORTED_BITS for g in GRIDS]
    names += [f(b) for b in SUPPORTED_BITS for f in (pack_name, unpack_name)] + [DIVIDE_COLS]
    names += [dequant_name(b, o, i, g) for b in SUPPORTED_BITS for g in GRIDS for o in CUDA_TYPES for i in INDEX_TYPES]
    names += [gemv_name(b, n, g) for b in SUPPORTED_BITS for g in GRIDS for n in GEMV_BATCHES]
    return names


# -- launch plans ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch: name expression, grid, block and arguments (arrays and
    NumPy scalars of the exact C types, as cupy.RawKernel and cuLaunchKernel want)."""

    name: str
    grid: tuple
    block: tuple
    args: tuple


def _i32(v: int) -> np.int32:
    if not 0 <= v <= np.iinfo(np.int32).max:
        raise ValueError(f"size {v} does not fit the kernels' int32 indices")
    return np.int32(v)


def _check(a, name, dtype, shape):
    if a.dtype != np.dtype(dtype) or tuple(a.shape) != tuple(shape) or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous {np.dtype(dtype)} {tuple(shape)}, got {a.dtype} {a.shape}")


def _grid1(work: int, threads: int) -> tuple:
    return (max(1, min(-(-work // threads), 2**31 - 1)), 1, 1)


def _grid_params(like, rows: int, ng: int, cols: int, bits: int, zeros, codebook, col):
    """(grid name, zeros, codebook, col, has_col) as the kernels take them: checked float32
    arrays, a one-element placeholder (same array module as ``like``) where there is none."""
    xp = array_module(like)
    if zeros is not None and codebook is not None:
        raise ValueError("a grid has zeros or a codebook, not both")
    grid = "asymmetric" if zeros is not None else "codebook" if codebook is not None else "symmetric"
    none = xp.zeros(1, np.float32)
    if zeros is not None:
        _check(zeros, "zeros", np.float32, (rows, ng))
    if codebook is not None:
        _check(codebook, "codebook", np.float32, (1 << bits,))
    if col is not None:
        _check(col, "col_scales", np.float32, (cols,))
    return (grid, none if zeros is None else zeros, none if codebook is None else codebook,
            none if col is None else col, np.int32(col is not None))


def encode_launch(x, scales, out, bits: int, group_size: int | None, zeros=None, codebook=None) -> Launch:
    """float32 x (rows, cols), float32 scales (rows, n_groups) and, for the other grids, float32
    zeros (rows, n_groups) or codebook (2^bits,) -> out uint32 (rows, packed). With column scales,
    ``x`` is :func:`divide_cols_launch`'s output."""
    bits = check_bits(bits)
    rows, cols = x.shape
    g, ng = group_layout(cols, group_size)
    _check(x, "x", np.float32, (rows, cols))
    _check(scales, "scales", np.float32, (rows, ng))
    _check(out, "out", np.uint32, (rows, packed_cols(cols, bits)))
    grid, z, cb, _, _ = _grid_params(x, rows, ng, cols, bits, zeros, codebook, None)
    return Launch(encode_name(bits, grid), _grid1(rows * -(-cols // BLOCK), THREADS), (THREADS, 1, 1),
                  (x, scales, z, cb, out, _i32(rows), _i32(cols), _i32(g), _i32(ng)))


def divide_cols_launch(x, col, out) -> Launch:
    """float32 out (rows, cols) = x / col[c], IEEE float32 quotients."""
    rows, cols = x.shape
    _check(x, "x", np.float32, (rows, cols))
    _check(col, "col_scales", np.float32, (cols,))
    _check(out, "out", np.float32, (rows, cols))
    return Launch(DIVIDE_COLS, _grid1(rows * cols, THREADS), (THREADS, 1, 1), (x, col, out, _i32(rows), _i32(cols)))


def pack_launch(codes, out, bits: int) -> Launch:
    bits = check_bits(bits)
    rows, cols = codes.shape
    _check(codes, "codes", np.uint8, (rows, cols))
    _check(out, "out", np.uint32, (rows, packed_cols(cols, bits)))
    return Launch(pack_name(bits), _grid1(rows * -(-cols // BLOCK), THREADS), (THREADS, 1, 1),
                  (codes, out, _i32(rows), _i32(cols)))


def unpack_launch(packed, out, bits: int) -> Launch:
    bits = check_bits(bits)
    rows, cols = out.shape
    _check(packed, "packed", np.uint32, (rows, packed_cols(cols, bits)))
    _check(out, "out", np.uint8, (rows, cols))
    return Launch(unpack_name(bits), _grid1(rows * -(-cols // BLOCK), THREADS), (THREADS, 1, 1),
                  (packed, out, _i32(rows), _i32(cols)))


def _out_name(out) -> str:
    name = "bfloat16" if out.dtype == bfloat16 else out.dtype.name
    if name not in CUDA_TYPES:
        raise ValueError(f"output dtype must be one of {list(CUDA_TYPES)}, got {out.dtype}")
    return name


def _tensor_params(rows: int, cols: int, qweight, scales, rowptr, ocols, ovals, bits: int, group_size: int | None,
                   zeros, codebook, col) -> tuple:
    """A quantized (rows, cols) tensor's arrays checked as the kernels take them (the CSR checked to
    stay inside the matrix, O(nnz)): (grid name, g, n_groups, (qweight, scales, zeros, codebook, col,
    has_col), (rowptr, ocols), (ovals, vtype))."""
    g, ng = group_layout(cols, group_size)
    _check(qweight, "qweight", np.uint32, (rows, packed_cols(cols, bits)))
    _check(scales, "scales", np.float32, (rows, ng))
    grid, z, cb, c, has_col = _grid_params(qweight, rows, ng, cols, bits, zeros, codebook, col)
    check_csr(rowptr, ocols, ovals, (rows, cols))
    rowptr = rowptr.astype(np.int32, copy=False)  # the kernels' index type (uint16 widened: rows + 1 entries)
    _check(rowptr, "outlier_rowptr", np.int32, (rows + 1,))
    _check(ocols, "outlier_cols", ocols.dtype, ocols.shape)
    vname = "bfloat16" if ovals.dtype == bfloat16 else ovals.dtype.name
    if vname not in VTYPE:
        raise ValueError(f"outlier_vals dtype {ovals.dtype} is not a weight dtype")
    _check(ovals, "outlier_vals", ovals.dtype, ovals.shape)
    return grid, g, ng, (qweight, scales, z, cb, c, has_col), (rowptr, ocols), (ovals, np.int32(VTYPE[vname]))


def dequant_launch(qweight, scales, rowptr, ocols, ovals, out, bits: int, group_size: int | None, zeros=None,
                   codebook=None, col=None) -> Launch:
    """Dense ``out`` (rows, cols) = level(codes) * scales (* col) with the CSR outliers written in,
    one launch; grid parameters as in :func:`encode_launch`. The CSR is checked to stay inside
    ``out`` first (O(nnz))."""
    bits = check_bits(bits)
    rows, cols = out.shape
    oname = _out_name(out)
    _check(out, "out", out.dtype, (rows, cols))
    grid, g, ng, dense, csr, vals = _tensor_params(rows, cols, qweight, scales, rowptr, ocols, ovals, bits, group_size,
                                                   zeros, codebook, col)
    if rows > 2**31 - 1 or -(-cols // DQ_TILE) > 65535:
        raise ValueError(f"shape {(rows, cols)} is too large for the dequant grid")
    return Launch(dequant_name(bits, oname, ocols.dtype.name, grid), (rows, -(-cols // DQ_TILE), 1),
                  (DQ_THREADS, 1, 1), (*dense, *csr, *vals, out, _i32(rows), _i32(cols), _i32(g), _i32(ng)))


def gemv_warps(bits: int, cols: int) -> int:
    """Warps of a GEMV block for rows of ``cols`` columns: one 32-lane pass over the row's vector
    units (16-byte loads; 2 packing blocks at 2 bits, 4 at 3) each, at most GV_WARPS."""
    blocks = -(-cols // BLOCK)
    units = -(-blocks // {2: 2, 3: 4}.get(bits, 1))
    return max(1, min(GV_WARPS, -(-units // 32)))


def gemv_launch(x, qweight, scales, rowptr, ocols, ovals, out, bits: int, group_size: int | None, zeros=None,
                codebook=None, col=None, warps: int | None = None) -> Launch:
    """float32 ``out`` (batch, rows) = ``x`` (batch, cols) float32 @ W^T for 1 <= batch <= max(GEMV_BATCHES),
    from the packed W (arrays as in :func:`dequant_launch`) with its outliers, one launch. A block
    takes GV_ROWS rows, its ``warps`` (default :func:`gemv_warps`) splitting their columns."""
    bits = check_bits(bits)
    batch, rows = out.shape
    cols = x.shape[1] if x.ndim == 2 else -1
    if not 1 <= batch <= GEMV_BATCHES[-1]:
        raise ValueError(f"the GEMV takes 1 to {GEMV_BATCHES[-1]} rows of x, got {batch}")
    _check(x, "x", np.float32, (batch, cols))
    _check(out, "out", np.float32, (batch, rows))
    grid, g, ng, dense, (rp, oc), vals = _tensor_params(rows, cols, qweight, scales, rowptr, ocols, ovals, bits,
                                                        group_size, zeros, codebook, col)
    warps = gemv_warps(bits, cols) if warps is None else warps
    if not 1 <= warps <= GV_WARPS:
        raise ValueError(f"a GEMV block has 1 to {GV_WARPS} warps, got {warps}")
    nb = next(n for n in GEMV_BATCHES if n >= batch)
    return Launch(gemv_name(bits, nb, grid), _grid1(rows, GV_ROWS), (32 * warps, 1, 1),
                  (x, _i32(batch), *dense, rp, oc, np.int32(oc.dtype == np.int32), *vals, out, _i32(rows),
                   _i32(cols), _i32(g), _i32(ng)))
