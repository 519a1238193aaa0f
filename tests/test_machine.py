"""The machine line of reports: the CPU's model with its LLVM name and widest vector ISA."""
import re

from eqcore import machine


def test_vector_isa_names_the_widest_instruction_set():
    assert machine.vector_isa("fpu sse4_2 avx avx2 avx512f avx512bw".split()) == "AVX-512"
    assert machine.vector_isa("fpu sse4_2 avx fma avx2 bmi2".split()) == "AVX2"
    assert machine.vector_isa("fpu sse4_2".split()) == "SSE4.2"
    assert machine.vector_isa(["neon", "asimd"]) is None


def test_cpu_name_adds_the_compile_target_and_isa(monkeypatch):
    monkeypatch.setattr(machine, "_cpuinfo", lambda: {"model name": "AMD EPYC", "flags": "fpu avx avx2"})
    monkeypatch.setattr(machine, "_llvm_cpu", lambda: "znver3")
    assert machine.cpu_name() == "AMD EPYC (znver3, AVX2)"
    monkeypatch.setattr(machine, "_llvm_cpu", lambda: None)
    assert machine.cpu_name() == "AMD EPYC (AVX2)"
    monkeypatch.setattr(machine, "_cpuinfo", lambda: {})
    monkeypatch.setattr(machine.platform, "processor", lambda: "")
    monkeypatch.setattr(machine.platform, "machine", lambda: "x86_64")
    assert machine.cpu_name() == "x86_64"


def test_cpu_name_of_this_machine_is_one_line():
    name = machine.cpu_name()
    assert name and "\n" not in name and not re.search(r"\(\s*\)", name)
