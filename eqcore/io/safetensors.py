"""Streaming safetensors: checked lazy reads and atomic, single-pass, bounded-memory writes.

The format is an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``
(which may end in spaces) and the raw little-endian tensor bytes. The ``safetensors`` package
needs every tensor in memory to write a file and has no bfloat16 for NumPy; this module
streams tensors one at a time and reads bfloat16 through ml_dtypes. Files stay
byte-compatible.
"""
from __future__ import annotations

import json
import math
import mmap as _mmap
import os
import shutil
import stat
import struct

import numpy as np

from .atomic import create_file, fsync_dir, partial_path, remove, remove_stale
from ..dtypes import bfloat16
from ..errors import FormatError

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": bfloat16,
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


def open_regular(path):
    """Open ``path`` for reading, refusing anything but a regular file (a FIFO would block)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FormatError(f"{path}: not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class SafetensorsReader:
    """Lazy reader: ``with SafetensorsReader(path) as f: w = f.get("name")``.

    The header is checked in full when the file is opened (types, shapes, offsets, overlaps).
    :meth:`get` reads one tensor into a new array (only its bytes are read). With
    ``mmap=True`` it returns read-only views of the memory-mapped file instead: no copy, but
    if the file is truncated or rewritten while a view is alive, touching the view kills the
    process with SIGBUS.
    """

    def __init__(self, path, *, mmap: bool = False):
        self.path = os.fspath(path)
        self.mmap = mmap
        self._map = None
        self._file = open_regular(self.path)
        try:
            self._parse()
        except BaseException:
            self._file.close()
            raise

    def _fail(self, msg):
        raise FormatError(f"{self.path}: {msg}")

    def _parse(self):
        size = os.fstat(self._file.fileno()).st_size
        raw = self._file.read(8)
        if len(raw) < 8:
            self._fail("not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, MAX_HEADER):
            self._fail(f"header length {n} exceeds the file ({size} bytes); truncated or not safetensors")
        try:
            header = json.loads(self._file.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self._fail(f"header is not valid JSON ({e})")
        except RecursionError:
            self._fail("header JSON is nested too deeply")
        if not isinstance(header, dict):
            self._fail("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            self._fail("__metadata__ must map strings to strings")
        self.metadata = meta
        self._data_start = 8 + n
        self._size = size
        data_len = size - self._data_start
        self._entries = {}
        spans = []
        for name, e in header.items():
            dtype = e.get("dtype") if isinstance(e, dict) else None
            if not isinstance(dtype, str) or dtype not in DTYPES:
                self._fail(f"tensor {name!r}: unknown or missing dtype {dtype if isinstance(e, dict) else e!r}")
            shape, offs = e.get("shape"), e.get("data_offsets")
            if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
                self._fail(f"tensor {name!r}: bad shape {shape!r}")
            if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)
                    and 0 <= offs[0] <= offs[1] <= data_len):
                self._fail(f"tensor {name!r}: data_offsets {offs!r} outside the {data_len}-byte data section")
            dt = DTYPES[dtype]
            nbytes = math.prod(shape) * dt.itemsize  # Python ints: no wrap-around
            if offs[1] - offs[0] != nbytes:
                self._fail(f"tensor {name!r}: {offs[1] - offs[0]} bytes do not hold {dtype} {shape}")
            self._entries[name] = (dt, tuple(shape), offs[0])
            spans.append(tuple(offs))
        spans.sort()
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
            self._fail("tensors overlap in the data section")

    def keys(self):
        return list(self._entries)

    def __contains__(self, name):
        return name in self._entries

    def info(self, name) -> tuple[np.dtype, tuple]:
        """(dtype, shape) of a tensor without reading it."""
        dt, shape, _ = self._entry(name)
        return dt, shape

    def _entry(self, name):
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def get(self, name) -> np.ndarray:
        """The tensor ``name``: a new array, or a read-only view of the file if ``mmap=True``."""
        dt, shape, off = self._entry(name)
        count = math.prod(shape)
        if count == 0:
            return np.zeros(shape, dtype=dt)
        start = self._data_start + off
        if self.mmap:
            if self._map is None:
                self._map = _mmap.mmap(self._file.fileno(), 0, access=_mmap.ACCESS_READ)
            return np.frombuffer(self._map, dtype=dt, count=count, offset=start).reshape(shape)
        out = np.empty(count, dtype=dt)
        self._read_into(memoryview(out.view(np.uint8)), start, name)
        return out.reshape(shape)

    def _read_into(self, buf: memoryview, start: int, name: str) -> None:
        fd, done, n = self._file.fileno(), 0, len(buf)
        while done < n:
            if hasattr(os, "preadv"):
                got = os.preadv(fd, [buf[done:]], start + done)
            else:  # pragma: no cover - platforms without preadv
                self._file.seek(start + done)
                got = self._file.readinto(buf[done:])
            if not got:
                self._fail(f"file ended while reading tensor {name!r}; it was truncated or changed")
            done += got

    def close(self):
        # mapped views handed out keep the mapping alive; closing the file object is enough
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _json(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def entry_size(name: str, ndim: int) -> int:
    """Upper bound of the header bytes one tensor entry takes (20-digit numbers)."""
    return len(_json({name: {"dtype": "BF16", "shape": [0] * ndim, "data_offsets": [0, 0]}})) + 21 * (ndim + 2)


class SafetensorsWriter:
    """Atomic streaming writer: each tensor is written once, straight into a partial file beside
    ``path`` after ``header_reserve`` bytes kept free for the header; :meth:`close` writes the
    header there (padded with spaces, which the format allows) and renames the file into
    place. If the header outgrows the reserve, the data is copied once behind a bigger one.
    On error nothing is left behind and ``path`` is untouched.
    """

    def __init__(self, path, metadata: dict | None = None, *, header_reserve: int = 1 << 16):
        self.path = os.path.abspath(os.fspath(path))
        self.metadata = dict(metadata or {})
        self._header = {}
        self._offset = 0
        self._reserve = -(-max(0, int(header_reserve)) // 8) * 8
        remove_stale(self.path)
        self._tmp = partial_path(self.path)
        self._file = create_file(self._tmp)
        try:
            self._file.seek(8 + self._reserve)
        except BaseException:
            self.abort()
            raise

    def add(self, name: str, array: np.ndarray) -> None:
        if not isinstance(name, str) or name in self._header or name == "__metadata__":
            raise ValueError(f"duplicate or reserved tensor name {name!r}")
        a = np.asarray(array)
        dt = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if dt not in CODES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be stored in safetensors")
        a = np.ascontiguousarray(a, dtype=dt)
        if a.size:
            try:
                self._file.write(a.reshape(-1).view(np.uint8).data)
            except OSError as e:  # disk full, quota, ...: say which output
                raise OSError(e.errno, e.strerror, self.path) from e
        self._header[name] = {"dtype": CODES[dt], "shape": list(a.shape),
                              "data_offsets": [self._offset, self._offset + a.nbytes]}
        self._offset += a.nbytes

    def sizes(self) -> dict[str, int]:
        """Bytes of each tensor added so far, by name."""
        return {k: e["data_offsets"][1] - e["data_offsets"][0] for k, e in self._header.items()}

    def close(self) -> None:
        header = dict(self._header)
        if self.metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in self.metadata.items()}
        blob = _json(header)
        try:
            if len(blob) <= self._reserve:
                self._file.seek(0)
                self._file.write(struct.pack("<Q", self._reserve) + blob + b" " * (self._reserve - len(blob)))
            else:
                self._regrow(blob)
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self.path)
            fsync_dir(os.path.dirname(self.path))
        except OSError as e:
            self.abort()
            raise OSError(e.errno, e.strerror, e.filename or self.path) from e
        except BaseException:
            self.abort()
            raise

    def _regrow(self, blob: bytes) -> None:
        """Header larger than reserved: copy the data once behind a header of the right size."""
        blob += b" " * (-len(blob) % 8)
        tmp = partial_path(self.path)
        try:
            with create_file(tmp) as out, open(self._tmp, "rb") as data:
                out.write(struct.pack("<Q", len(blob)) + blob)
                data.seek(8 + self._reserve)
                shutil.copyfileobj(data, out, 1 << 22)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            remove(tmp)
            raise
        self._file.close()
        os.replace(tmp, self._tmp)
        self._file = open(self._tmp, "rb+")

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            remove(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.abort()
