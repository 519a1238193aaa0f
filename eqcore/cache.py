"""Where eqcore keeps compiled code: a user cache folder, never the installed package.

``$EQCORE_CACHE_DIR``, else ``$XDG_CACHE_HOME/eqcore``, else ``~/.cache/eqcore``; NVRTC cubins
go to ``kernels/`` and Numba's compiled functions to ``numba/``. Numba would otherwise write
``__pycache__`` files inside site-packages, which outlive ``pip uninstall`` and then shadow a
later install. Numba entries are keyed on every eqcore source file, so editing a module whose
code is inlined into a kernel (e.g. ``solvers/rowmath.py``) recompiles it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def root() -> Path:
    base = os.environ.get("EQCORE_CACHE_DIR")
    if base:
        return Path(base)
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "eqcore"


def sources_stamp() -> bytes:
    """A digest of the (path, mtime, size) of every eqcore source file."""
    h = hashlib.sha256()
    for p in sorted(PACKAGE.rglob("*.py")):
        st = p.stat()
        h.update(f"{p.relative_to(PACKAGE)}\0{st.st_mtime_ns}\0{st.st_size}\0".encode())
    return h.digest()


_installed = False


def install_numba_locator() -> None:
    """Make Numba cache eqcore's functions under :func:`root` (unless NUMBA_CACHE_DIR is set,
    which Numba honours itself). Safe to call many times."""
    global _installed
    if _installed:
        return
    _installed = True
    from numba.core import caching, config

    base = getattr(caching, "UserProvidedCacheLocator", None) or getattr(caching, "_UserProvidedCacheLocator")
    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl")

    class EqcoreCacheLocator(base):
        def __init__(self, py_func, py_file):
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            self._cache_path = str(root() / "numba" / self.get_suitable_cache_subpath(py_file))

        def get_source_stamp(self):
            return sources_stamp()

        @classmethod
        def from_function(cls, py_func, py_file):
            if config.CACHE_DIR or not Path(py_file).resolve().is_relative_to(PACKAGE):
                return None
            self = cls(py_func, py_file)
            try:
                self.ensure_cache_path()
            except OSError:
                return None
            return self

    impl._locator_classes.insert(0, EqcoreCacheLocator)
