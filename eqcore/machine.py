"""Where a measurement was taken: the CPU's name, for benchmark and demo reports."""
import platform
from pathlib import Path


def _cpuinfo() -> dict:
    """The first processor's fields in /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _llvm_cpu() -> str | None:
    """LLVM's name for this CPU (what Numba compiles for: "znver3", "skylake-avx512"), if known."""
    try:
        import llvmlite.binding as llvm

        name = llvm.get_host_cpu_name()
    except Exception:  # llvmlite absent or unusable: the name is only a label
        return None
    return name if name and name != "generic" else None


def vector_isa(flags) -> str | None:
    """The widest x86 vector instruction set among /proc/cpuinfo ``flags``: "AVX-512", "AVX2", "AVX",
    "SSE4.2", or None (none of them, or not x86)."""
    flags = set(flags)
    for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2")):
        if flag in flags:
            return name
    return None


def cpu_name() -> str:
    """The CPU model, with what code is compiled for on it: "AMD EPYC (znver3, AVX2)". Two machines
    with one model name (a cloud's "AMD EPYC") can differ twofold in speed, so reports say both."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine() or "unknown"
    detail = [d for d in (_llvm_cpu(), vector_isa(info.get("flags", "").split())) if d]
    return f"{name} ({', '.join(detail)})" if detail else name
