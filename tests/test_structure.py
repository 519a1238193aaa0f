"""The package's shape: no import cycles (lazy imports included), data types that import no
algorithm, and an `eqcore` that imports and works without the evaluation's or the GPU's
dependencies."""
import ast
import subprocess
import sys
from pathlib import Path

import eqcore

PACKAGE = Path(eqcore.__file__).resolve().parent


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """eqcore modules imported anywhere in ``path`` (module level or inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("eqcore"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("eqcore"):
                continue
            for a in node.names:  # `from . import x` may name a submodule
                sub = f"{mod}.{a.name}"
                out.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                        or (PACKAGE.parent / sub.replace(".", "/") / "__init__.py").exists() else mod)
    out.discard(name)
    return out


def graph() -> dict[str, set[str]]:
    """{module: eqcore modules it imports}, with the packages an import initialises on the way
    (importing a.b.c runs a.b's __init__) except a module's own ancestors, which are always
    initialised before it; an explicit import of an ancestor (``from .. import x``) counts."""
    explicit = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}
    g = {}
    for m, deps in explicit.items():
        edges = set(deps)
        for d in deps:
            parts = d.split(".")
            edges.update(p for p in (".".join(parts[:i]) for i in range(2, len(parts)))
                         if not m.startswith(p + "."))
        g[m] = {d for d in edges if d in explicit and d != m}
    return g


def find_cycle(g):
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                c = visit(d)
                if c:
                    return c
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(g):
        if m not in state:
            c = visit(m)
            if c:
                return c
    return None


def test_no_import_cycles():
    g = graph()
    assert len(g) > 20 and "eqcore.api" in g and "eqcore.backends.numba" in g["eqcore.solvers.adam_numba"]
    assert find_cycle(g) is None, " -> ".join(find_cycle(g))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_data_types_import_no_algorithm():
    g = graph()
    algorithms = {m for m in g if m.startswith(("eqcore.api", "eqcore.backends", "eqcore.solvers", "eqcore.io"))}

    def reach(m, seen=None):
        seen = set() if seen is None else seen
        for d in g[m]:
            if d not in seen:
                seen.add(d)
                reach(d, seen)
        return seen

    for data_type in ("eqcore.tensor", "eqcore.config", "eqcore.layout", "eqcore.outliers"):
        bad = reach(data_type) & algorithms - {"eqcore.solvers"}  # config validates solver names
        assert not bad, (data_type, sorted(bad))


BLOCKED = r"""
import importlib.abc, sys
BLOCK = {"torch", "jax", "jaxlib", "transformers", "tokenizers", "gguf", "matplotlib", "hqq", "cupy",
         "cupyx", "numba.cuda", "cuda", "bench"}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in BLOCK or any(name.startswith(b + ".") for b in BLOCK):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Blocker())
import numpy as np, eqcore, eqcore.cli
w = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float16)
for backend in ("numpy", "numba"):
    qt = eqcore.quantize(w, bits=4, steps=5, backend=backend)
    assert eqcore.dequantize(qt).shape == (32, 64)
assert eqcore.cli.build_parser().parse_args(["demo"]).command == "demo"
print("ok", sorted(m for m in sys.modules if m.split(".")[0] in BLOCK))
"""


def test_eqcore_works_without_the_evaluation_or_gpu_dependencies():
    r = subprocess.run([sys.executable, "-c", BLOCKED], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "ok []"


def test_the_evaluation_is_not_in_the_package():
    assert not (PACKAGE / "evaluation").exists()
    assert not any("forward" in p.name or "perplexity" in p.name for p in PACKAGE.rglob("*.py"))
