"""The CUDA C kernels of ``raw_kernels/``: names, NVRTC compilation, launch plans.

Importable without a GPU or CuPy: compilation needs only NVRTC (the CUDA pip wheel's,
through ``cupy.cuda.nvrtc`` or ``cuda.bindings.nvrtc``) and launch plans are plain
Python. :mod:`eqcore.gpu` runs the plans with CuPy; ``tests/test_raw_kernels_host.py``
runs the same plans on the host with the kernels compiled by g++.

Kernels are compiled here rather than by ``cupy.RawModule(code=...)`` because CuPy
appends ``-ftz=true``, which would flush float32 subnormals and break the rounding
contract. The cubin is cached on disk and loaded with ``cupy.RawModule(path=...)``.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .dtypes import bfloat16
from .outliers import check_csr
from .packing import BLOCK, packed_cols
from .scales import group_layout

SOURCE = "eqcore_kernels.cu"
THREADS, DQ_THREADS, SC_THREADS = 256, 128, 128  # must match raw_kernels/eqcore_kernels.cu
DQ_TILE = DQ_THREADS * BLOCK

# weight dtype -> CUDA type; the index is the `vtype` code of load_val() in the .cu
CUDA_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double"}
VTYPE = {name: i for i, name in enumerate(CUDA_TYPES)}
INDEX_TYPES = {"uint16": "unsigned short", "int32": "int"}
BITS = (2, 3, 4, 8)

# IEEE float32 division/multiplication and subnormals kept: never fast-math or ftz.
NVRTC_OPTIONS = ("-std=c++17", "-ftz=false", "-prec-div=true", "-prec-sqrt=true", "-fmad=false")


def kernel_dir() -> Path:
    """raw_kernels/: $EQCORE_KERNEL_DIR, else installed package data, else the source checkout."""
    here = Path(__file__).resolve().parent
    env = os.environ.get("EQCORE_KERNEL_DIR")
    for d in ([Path(env)] if env else [here / "raw_kernels", here.parent / "raw_kernels"]):
        if (d / SOURCE).is_file():
            return d
    raise FileNotFoundError(f"{SOURCE} not found next to {here} (package data missing?)")


def source() -> str:
    return (kernel_dir() / SOURCE).read_text()


# -- kernel names (NVRTC name expressions) ---------------------------------------------
def encode_name(bits: int) -> str:
    return f"eq::encode<{bits}>"


def pack_name(bits: int) -> str:
    return f"eq::pack<{bits}>"


def unpack_name(bits: int) -> str:
    return f"eq::unpack<{bits}>"


def dequant_name(bits: int, out: str, index: str) -> str:
    return f"eq::dequant<{bits}, {CUDA_TYPES[out]}, {INDEX_TYPES[index]}>"


def scatter_name(out: str, index: str) -> str:
    return f"eq::scatter_outliers<{CUDA_TYPES[out]}, {INDEX_TYPES[index]}>"


def all_names() -> list[str]:
    """Every instantiation the library can launch."""
    names = [f(b) for b in BITS for f in (encode_name, pack_name, unpack_name)]
    names += [dequant_name(b, o, i) for b in BITS for o in CUDA_TYPES for i in INDEX_TYPES]
    names += [scatter_name(o, i) for o in CUDA_TYPES for i in INDEX_TYPES]
    return names


# -- NVRTC --------------------------------------------------------------------------------
def cuda_include_dir() -> str | None:
    """Directory holding cuda_fp16.h: the CUDA pip wheel (via CuPy), $CUDA_PATH, /usr/local/cuda."""
    cands = []
    try:
        from cupy._environment import get_cuda_path

        cands.append(get_cuda_path())
    except Exception:
        pass
    cands += [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    try:
        import nvidia.cu13 as _cu13  # the cuda-toolkit pip wheel

        cands.append(list(_cu13.__path__)[0])
    except Exception:
        pass
    for c in cands:
        if c and (Path(c) / "include" / "cuda_fp16.h").is_file():
            return str(Path(c) / "include")
    return None


def nvrtc_options(arch: str, extra=()) -> list[str]:
    """Options for ``arch`` ("sm_90" for a cubin, "compute_90" for PTX)."""
    opts = [f"-arch={arch}", *NVRTC_OPTIONS, f"-I{kernel_dir()}", *extra]
    inc = cuda_include_dir()
    if inc:
        opts.append(f"-I{inc}")
    return opts


@dataclasses.dataclass
class Compiled:
    image: bytes          # cubin (arch sm_XX) or PTX (compute_XX)
    lowered: dict         # name expression -> mangled symbol
    log: str              # NVRTC log (ptxas -v output when requested)


def nvrtc_compile(names, arch: str, extra_options=()) -> Compiled:
    """Compile the kernels ``names`` for ``arch`` with NVRTC; RuntimeError with the log on failure."""
    from cupy.cuda import nvrtc

    names = list(names)
    prog = nvrtc.createProgram(source(), SOURCE, [], [])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        try:
            nvrtc.compileProgram(prog, nvrtc_options(arch, extra_options))
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"NVRTC failed for {arch}: {e}\n{nvrtc.getProgramLog(prog)}") from None
        image = nvrtc.getCUBIN(prog) if arch.startswith("sm_") else nvrtc.getPTX(prog)
        lowered = {n: nvrtc.getLoweredName(prog, n) for n in names}
        return Compiled(image if isinstance(image, bytes) else image.encode(), lowered, nvrtc.getProgramLog(prog))
    finally:
        nvrtc.destroyProgram(prog)


def cache_dir() -> Path:
    base = os.environ.get("EQCORE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "eqcore", "kernels")
    return Path(base)


def compiled_file(names, arch: str) -> tuple[Path, dict]:
    """(cubin/PTX path, lowered names) for ``names`` on ``arch``, compiled once and cached on disk."""
    from cupy.cuda import nvrtc

    names = sorted(names)
    key = hashlib.sha256("\0".join([source(), arch, *nvrtc_options(arch), str(nvrtc.getVersion()), *names])
                         .encode()).hexdigest()[:32]
    d = cache_dir()
    image = d / f"{key}.{'cubin' if arch.startswith('sm_') else 'ptx'}"
    meta = d / f"{key}.json"
    if not (image.is_file() and meta.is_file()):
        c = nvrtc_compile(names, arch)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f"{key}.{os.getpid()}.tmp"
        tmp.write_bytes(c.image)
        os.replace(tmp, image)
        tmp.write_text(json.dumps(c.lowered))
        os.replace(tmp, meta)
    return image, json.loads(meta.read_text())


@functools.lru_cache(maxsize=None)
def device_arch(device_id: int) -> str:
    """sm_XX of CuPy device ``device_id`` (compute_XX if NVRTC cannot emit its cubin)."""
    import cupy
    from cupy.cuda import nvrtc

    cc = int(cupy.cuda.Device(device_id).compute_capability)
    supported = getattr(nvrtc, "getSupportedArchs", lambda: ())()
    return f"sm_{cc}" if not supported or cc in supported else f"compute_{max(a for a in supported if a <= cc)}"


@functools.lru_cache(maxsize=None)
def _function(name: str, arch: str):
    import cupy

    path, lowered = compiled_file([name], arch)
    return cupy.RawModule(path=str(path)).get_function(lowered[name])


def get_function(name: str):
    """The cupy.RawKernel of one instantiation on the current device."""
    import cupy

    return _function(name, device_arch(cupy.cuda.Device().id))


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


def encode_launch(x, scales, out, bits: int, group_size: int | None) -> Launch:
    """float32 x (rows, cols), float32 scales (rows, n_groups) -> out uint32 (rows, packed)."""
    rows, cols = x.shape
    g, ng = group_layout(cols, group_size)
    _check(x, "x", np.float32, (rows, cols))
    _check(scales, "scales", np.float32, (rows, ng))
    _check(out, "out", np.uint32, (rows, packed_cols(cols, bits)))
    return Launch(encode_name(bits), _grid1(rows * -(-cols // BLOCK), THREADS), (THREADS, 1, 1),
                  (x, scales, out, _i32(rows), _i32(cols), _i32(g), _i32(ng)))


def pack_launch(codes, out, bits: int) -> Launch:
    rows, cols = codes.shape
    _check(codes, "codes", np.uint8, (rows, cols))
    _check(out, "out", np.uint32, (rows, packed_cols(cols, bits)))
    return Launch(pack_name(bits), _grid1(rows * -(-cols // BLOCK), THREADS), (THREADS, 1, 1),
                  (codes, out, _i32(rows), _i32(cols)))


def unpack_launch(packed, out, bits: int) -> Launch:
    rows, cols = out.shape
    _check(packed, "packed", np.uint32, (rows, packed_cols(cols, bits)))
    _check(out, "out", np.uint8, (rows, cols))
    return Launch(unpack_name(bits), _grid1(rows * -(-cols // BLOCK), THREADS), (THREADS, 1, 1),
                  (packed, out, _i32(rows), _i32(cols)))


def _csr_args(rowptr, ocols, ovals, rows, cols):
    """Kernel arguments of a CSR, after checking it stays inside (rows, cols) (O(nnz))."""
    nnz = int(ovals.shape[0])
    _check(rowptr, "outlier_rowptr", np.int32, (rows + 1,))
    check_csr(rowptr, ocols, ovals, (rows, cols))
    if ocols.dtype.name not in INDEX_TYPES:
        raise ValueError(f"outlier_cols must be uint16 or int32, got {ocols.dtype}")
    _check(ocols, "outlier_cols", ocols.dtype, (nnz,))
    vname = "bfloat16" if ovals.dtype == bfloat16 else ovals.dtype.name
    if vname not in VTYPE:
        raise ValueError(f"outlier_vals dtype {ovals.dtype} is not a weight dtype")
    _check(ovals, "outlier_vals", ovals.dtype, (nnz,))
    return ocols.dtype.name, (rowptr, ocols, ovals, np.int32(VTYPE[vname]))


def _out_name(out) -> str:
    name = "bfloat16" if out.dtype == bfloat16 else out.dtype.name
    if name not in CUDA_TYPES:
        raise ValueError(f"output dtype must be one of {list(CUDA_TYPES)}, got {out.dtype}")
    return name


def dequant_launch(qweight, scales, rowptr, ocols, ovals, out, bits: int, group_size: int | None) -> Launch:
    """Dense ``out`` (rows, cols) = codes * scales with the CSR outliers written in, one launch."""
    rows, cols = out.shape
    g, ng = group_layout(cols, group_size)
    _check(qweight, "qweight", np.uint32, (rows, packed_cols(cols, bits)))
    _check(scales, "scales", np.float32, (rows, ng))
    oname = _out_name(out)
    _check(out, "out", out.dtype, (rows, cols))
    index, csr = _csr_args(rowptr, ocols, ovals, rows, cols)
    if rows > 2**31 - 1 or -(-cols // DQ_TILE) > 65535:
        raise ValueError(f"shape {(rows, cols)} is too large for the dequant grid")
    return Launch(dequant_name(bits, oname, index), (rows, -(-cols // DQ_TILE), 1), (DQ_THREADS, 1, 1),
                  (qweight, scales, *csr, out, _i32(rows), _i32(cols), _i32(g), _i32(ng)))


def scatter_launch(rowptr, ocols, ovals, out) -> Launch:
    """Write the CSR outliers into the dense C-contiguous ``out`` (rows, cols) in place."""
    rows, cols = out.shape
    oname = _out_name(out)
    _check(out, "out", out.dtype, (rows, cols))
    index, csr = _csr_args(rowptr, ocols, ovals, rows, cols)
    return Launch(scatter_name(oname, index), (max(1, min(rows, 2**31 - 1)), 1, 1), (SC_THREADS, 1, 1),
                  (*csr, out, _i32(rows), _i32(cols)))
