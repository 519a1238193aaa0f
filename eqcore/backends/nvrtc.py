"""Compiling ``raw_kernels/`` with NVRTC, caching the cubins, loading them with CuPy.

Compilation needs only NVRTC (the ``cuda-bindings`` package and the CUDA pip wheels), not a
GPU nor CuPy, so the compile gates run on any machine. Kernels are compiled here rather than
by ``cupy.RawModule(code=...)`` because CuPy appends ``-ftz=true``, which would flush float32
subnormals and break the rounding contract. The layout and launch geometry come from Python
as -D defines (:func:`options`). Cubins are cached under :func:`eqcore.cache.root`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from pathlib import Path

from .. import cache
from ..layout import cuda_defines
from . import launch

HEADER = "eqcore.cuh"
SOURCES = ("codec.cu", "dequant.cu", "matmul.cu")

# IEEE float32 division/multiplication and subnormals kept: never fast-math or ftz.
NVRTC_OPTIONS = ("-std=c++17", "-ftz=false", "-prec-div=true", "-prec-sqrt=true", "-fmad=false")


def kernel_dir() -> Path:
    """raw_kernels/: $EQCORE_KERNEL_DIR, else installed package data, else the source checkout."""
    here = Path(__file__).resolve().parents[1]
    env = os.environ.get("EQCORE_KERNEL_DIR")
    for d in ([Path(env)] if env else [here / "raw_kernels", here.parent / "raw_kernels"]):
        if (d / HEADER).is_file():
            return d
    raise FileNotFoundError(f"{HEADER} not found next to {here} (package data missing?)")


def source(name: str) -> str:
    return (kernel_dir() / name).read_text()


def defines() -> list[str]:
    """The -D options every kernel file needs: the layout and the launch geometry."""
    return [*cuda_defines(), *launch.cuda_defines()]


def cuda_include_dir() -> str | None:
    """Directory holding cuda_fp16.h: the CUDA pip wheel, $CUDA_PATH, $CUDA_HOME, /usr/local/cuda."""
    cands = []
    try:
        import nvidia.cu13 as _cu13  # the cuda-toolkit pip wheel

        cands.append(list(_cu13.__path__)[0])
    except Exception:
        pass
    cands += [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    for c in cands:
        if c and (Path(c) / "include" / "cuda_fp16.h").is_file():
            return str(Path(c) / "include")
    return None


def options(arch: str, extra=()) -> list[str]:
    """NVRTC options for ``arch`` ("sm_90" for a cubin, "compute_90" for PTX)."""
    opts = [f"-arch={arch}", *NVRTC_OPTIONS, *defines(), f"-I{kernel_dir()}", *extra]
    inc = cuda_include_dir()
    if inc:
        opts.append(f"-I{inc}")
    return opts


@dataclasses.dataclass
class Compiled:
    image: bytes          # cubin (arch sm_XX) or PTX (compute_XX)
    lowered: dict         # name expression -> mangled symbol
    log: str              # NVRTC log (ptxas -v output when requested)


def _check(result, what, prog=None):
    from cuda.bindings import nvrtc

    err, *rest = result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        log = _log(prog) if prog is not None else ""
        raise RuntimeError(f"NVRTC {what} failed: {err}\n{log}")
    return rest[0] if len(rest) == 1 else rest


def _log(prog) -> str:
    from cuda.bindings import nvrtc

    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    buf = bytearray(size)  # NVRTC writes into it: never an immutable (possibly shared) bytes object
    nvrtc.nvrtcGetProgramLog(prog, buf)
    return bytes(buf).rstrip(b"\0 ").decode(errors="replace")


def version() -> tuple[int, int]:
    from cuda.bindings import nvrtc

    return tuple(_check(nvrtc.nvrtcVersion(), "version"))


def supported_archs() -> list[int]:
    from cuda.bindings import nvrtc

    return list(_check(nvrtc.nvrtcGetSupportedArchs(), "getSupportedArchs"))


def nvrtc_compile(names, arch: str, extra_options=()) -> Compiled:
    """Compile the kernels ``names`` (all from one source file) for ``arch``; RuntimeError with the
    log on failure."""
    from cuda.bindings import nvrtc

    names = list(names)
    files = {launch.source_of(n) for n in names}
    if len(files) != 1:
        raise ValueError(f"kernels {names} come from several files {sorted(files)}; compile them apart")
    file = files.pop()
    prog = _check(nvrtc.nvrtcCreateProgram(source(file).encode(), file.encode(), 0, [], []), "createProgram")
    try:
        for n in names:
            _check(nvrtc.nvrtcAddNameExpression(prog, n.encode()), "addNameExpression")
        opts = [o.encode() for o in options(arch, extra_options)]
        _check(nvrtc.nvrtcCompileProgram(prog, len(opts), opts), f"compile for {arch}", prog)
        cubin = arch.startswith("sm_")
        size = _check(nvrtc.nvrtcGetCUBINSize(prog) if cubin else nvrtc.nvrtcGetPTXSize(prog), "size")
        buf = bytearray(size)
        _check(nvrtc.nvrtcGetCUBIN(prog, buf) if cubin else nvrtc.nvrtcGetPTX(prog, buf), "image")
        lowered = {n: _check(nvrtc.nvrtcGetLoweredName(prog, n.encode()), "lowered name").decode() for n in names}
        image = bytes(buf) if cubin else bytes(buf).rstrip(b"\0")
        return Compiled(image, lowered, _log(prog))
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


_STAY = r"(?:(?!Compiling entry function).)*?"  # within one entry's lines
_PTXAS = re.compile(r"Compiling entry function '(?P<fn>[^']+)'" + _STAY +
                    r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill loads"
                    + _STAY + r"Used (?P<regs>\d+) registers", re.S)


def ptxas_stats(log: str) -> dict[str, tuple[int, int, int, int]]:
    """{mangled kernel: (stack bytes, spill store bytes, spill load bytes, registers)} from the
    ``--ptxas-options=-v`` part of an NVRTC log."""
    return {m["fn"]: (int(m["stack"]), int(m["st"]), int(m["ld"]), int(m["regs"])) for m in _PTXAS.finditer(log)}


def compiled_file(names, arch: str) -> tuple[Path, dict]:
    """(cubin/PTX path, lowered names) for ``names`` on ``arch``, compiled once and cached on disk."""
    names = sorted(names)
    file = launch.source_of(names[0])
    key = hashlib.sha256("\0".join([source(HEADER), source(file), arch, *options(arch), str(version()), *names])
                         .encode()).hexdigest()[:32]
    d = cache.root() / "kernels"
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


def precompile(arch: str, names=None, jobs: int | None = None) -> int:
    """Compile ``names`` (default: every instantiation the library can launch) for ``arch`` into
    the cache, ``jobs`` processes at a time (default: one per CPU); returns how many. Run once on a
    new machine so that the first calls do not wait for NVRTC (about 0.5 s per kernel)."""
    import concurrent.futures
    import multiprocessing

    names = list(launch.all_names() if names is None else names)
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(names)))
    if jobs == 1:
        for n in names:
            compiled_file([n], arch)
        return len(names)
    ctx = multiprocessing.get_context("spawn")  # no CUDA context is inherited by a fork
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        list(pool.map(compiled_file, [[n] for n in names], [arch] * len(names)))
    return len(names)


@functools.lru_cache(maxsize=None)
def device_arch(device_id: int) -> str:
    """sm_XX of CuPy device ``device_id`` (compute_XX if NVRTC cannot emit its cubin)."""
    import cupy

    cc = int(cupy.cuda.Device(device_id).compute_capability)
    supported = supported_archs()
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


def run(plan: launch.Launch) -> None:
    """Launch a plan on the current CuPy device and stream."""
    get_function(plan.name)(plan.grid, plan.block, plan.args)
