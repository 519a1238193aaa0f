"""Whole checkpoints: quantize / dequantize a .safetensors file or a model folder, tensor by
tensor (checked reads of one tensor at a time, single-pass atomic writes).

Guarantees: the input is never written to, moved or deleted; the output appears complete
or not at all (work goes to a hidden partial path that is renamed into place, and the
partial files of killed runs are removed by the next run); an existing output is replaced
only when asked and only if eqcore wrote it (see :mod:`eqcore.folders`).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .atomic import create_file, fsync_dir, partial_path, remove, remove_stale
from .. import backends
from ..api import dequantize
from ..config import QuantConfig
from ..dtypes import WEIGHT_DTYPES, saturate, weight_dtype
from .fileformat import (OUTPUT_KEY, VERSION_KEY, entry_names, header_bound, quantized_names, read_entry,
                         write_entry)
from .folders import INDEX, Source, check_output, check_replaceable, scan, write_manifest
from ..tensor import QuantizedTensor
from .safetensors import SafetensorsReader, SafetensorsWriter
from .compute import combine_errors, quantize_rows, relative_error

DEFAULT_SKIP = r"embed|wte|wpe|lm_head"


def compile_skip(skip: str | None):
    """The ``skip`` regex, compiled; ValueError naming it if it is not a valid pattern."""
    if not skip:
        return None
    try:
        return re.compile(skip)
    except re.error as e:
        raise ValueError(f"skip pattern {skip!r} is not a valid regular expression ({e})") from None


def should_quantize(name: str, dtype, shape, skip: str | None = DEFAULT_SKIP, min_features: int = 16) -> bool:
    """2-D float weights with both sides >= ``min_features`` whose name does not match ``skip``."""
    pattern = compile_skip(skip) if isinstance(skip, str) else skip
    return (len(shape) == 2 and min(shape) >= min_features and np.dtype(dtype) in WEIGHT_DTYPES.values()
            and not (pattern and pattern.search(name)))


def _numel(reader: SafetensorsReader, name: str, qmeta: dict) -> int:
    """Elements of one logical tensor (a quantized one counts its dense shape)."""
    shape = qmeta[name].get("shape") if name in qmeta else reader.info(name)[1]
    ok = isinstance(shape, (list, tuple)) and all(isinstance(d, int) for d in shape)
    return math.prod(shape) if ok else 0


def _check_against_index(source: Source, readers: dict) -> None:
    """Every tensor in exactly the shard the index names, and in no other."""
    where = {}
    for shard, reader in readers.items():
        for key in reader.keys():
            if key in where:
                raise ValueError(f"tensor {key!r} is in two shards ({where[key]} and {shard}); refusing to guess")
            where[key] = shard
    wm = source.index["weight_map"]
    for key, shard in where.items():
        if key not in wm:
            raise ValueError(f"{shard} holds tensor {key!r}, which {INDEX} does not list")
        if wm[key] != shard:
            raise ValueError(f"tensor {key!r} is in {shard} but {INDEX} says {wm[key]}; it is in more than one "
                             "shard or the index is stale")
    absent = [k for k in wm if k not in where]
    if absent:
        raise ValueError(f"{INDEX} lists tensors that no shard holds: {absent[:5]}")


def convert_shard(reader: SafetensorsReader, path, convert_one, *, command: str, bar=None) -> dict[str, int]:
    """Stream every tensor of one shard through ``convert_one(name, value) -> (value, extra)``
    into a new file at ``path`` (atomic, one pass); returns the bytes of each stored tensor.
    The shard's own ``__metadata__`` is kept (minus stale eqcore entries)."""
    qmeta = quantized_names(reader)
    names = entry_names(reader)
    meta = {k: v for k, v in reader.metadata.items() if not k.startswith("eqcore.")}
    meta[OUTPUT_KEY] = command
    with SafetensorsWriter(path, meta, header_reserve=header_bound(names, meta)) as writer:
        for name in names:
            if bar is not None:
                bar.set_postfix_str(name[-40:], refresh=False)
            try:
                value, extra = convert_one(name, read_entry(reader, name, qmeta))
            except (ValueError, TypeError) as e:
                raise type(e)(f"{Path(reader.path).name}: tensor {name!r}: {e}") from e
            write_entry(writer, name, value, **extra)
            if bar is not None:
                bar.update(_numel(reader, name, qmeta))
        return writer.sizes()


def _copy_file(src: Path, dst: Path) -> None:
    """Copy a regular file's bytes (``cp``-like: mode from the source, minus the umask)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    mode = os.stat(src).st_mode & 0o777
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
        shutil.copyfileobj(f, out, 1 << 22)


def _convert(src, dst, convert_one, *, command: str, overwrite: bool, progress: bool,
             follow_symlinks: bool = False, need_quantized: bool = False, on_start=None, mmap: bool = False) -> None:
    """Shared driver: check the paths, convert every shard, copy the rest, commit atomically.
    ``on_start(readers, bar)``, if given, sees the checked shards (in writing order) and the
    progress bar before the first tensor is written; ``mmap`` reads tensors as views of the
    memory-mapped input (for drivers whose ``convert_one`` does not touch most of them)."""
    src, dst = Path(src), Path(dst)
    source = scan(src, follow_symlinks)
    check_output(src, dst, overwrite)
    remove_stale(dst)
    readers = {}
    try:
        for shard in source.shards:
            readers[shard] = SafetensorsReader(source.path(shard), mmap=mmap)
        if source.index is not None:
            _check_against_index(source, readers)
        if need_quantized and not any(quantized_names(r) for r in readers.values()):
            raise ValueError(f"{src} holds no quantized tensor; nothing to dequantize "
                             "(pass --allow-none / allow_none=True to copy it anyway)")
        total = sum(_numel(r, n, quantized_names(r)) for r in readers.values() for n in entry_names(r))
        with tqdm(total=total, unit="w", unit_scale=True, desc=command, disable=not progress) as bar:
            if on_start is not None:
                on_start(readers, bar)
            if source.is_file:
                if dst.is_dir() and not dst.is_symlink():
                    os.rmdir(dst)  # an empty folder (check_output refused any other)
                convert_shard(readers[source.shards[0]], dst, convert_one, command=command, bar=bar)
                return
            tmp = Path(partial_path(dst))
            os.mkdir(tmp)
            try:
                weight_map, total_size = {}, 0
                for shard, reader in readers.items():
                    (tmp / shard).parent.mkdir(parents=True, exist_ok=True)
                    sizes = convert_shard(reader, tmp / shard, convert_one, command=command, bar=bar)
                    for key, nbytes in sizes.items():
                        weight_map[key] = shard
                        total_size += nbytes
                for rel in source.others:
                    if rel == CONFIG:
                        _write_config(source.path(rel), tmp / rel, quantized=command == "quantize")
                    else:
                        _copy_file(source.path(rel), tmp / rel)
                for rel, target in source.links:
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(target, tmp / rel)
                if source.index is not None:
                    meta = {k: v for k, v in source.index.get("metadata", {}).items() if k != "total_size"} \
                        if isinstance(source.index.get("metadata"), dict) else {}
                    index = {"metadata": {**meta, "total_size": total_size}, "weight_map": weight_map}
                    with create_file(tmp / INDEX) as f:
                        f.write(json.dumps(index, indent=2, sort_keys=True).encode())
                write_manifest(tmp, command, source.root)
                _commit(tmp, dst)
            except OSError as e:  # name the output the user asked for, not our partial folder
                remove(tmp)
                name = str(e.filename or "").replace(str(tmp), str(dst))
                raise OSError(e.errno, e.strerror, name or None) from e
            except BaseException:
                remove(tmp)
                raise
    finally:
        for r in readers.values():
            r.close()


CONFIG = "config.json"  # a transformers model's configuration, at the folder's top
QUANT_CONFIG = {"quant_method": "eqcore", "load_with": "eqcore.torch.load_pretrained"}


def _write_config(src: Path, dst: Path, quantized: bool) -> None:
    """Copy a transformers config.json, marking a quantized output with ``quantization_config``
    (so that transformers warns that it does not know the method instead of loading silently)
    and removing eqcore's mark from a dequantized one. Not JSON: copied as it is."""
    try:
        config = json.loads(src.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        config = None
    if not isinstance(config, dict):
        _copy_file(src, dst)
        return
    if quantized:
        config["quantization_config"] = dict(QUANT_CONFIG)
    elif isinstance(config.get("quantization_config"), dict) and \
            config["quantization_config"].get("quant_method") == "eqcore":
        del config["quantization_config"]
    with create_file(dst) as f:
        f.write((json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


def _commit(tmp: Path, dst: Path) -> None:
    """Rename the finished folder into place, replacing an earlier output (checked again now)."""
    if os.path.lexists(dst):
        check_replaceable(dst)
        old = partial_path(dst, "old")
        os.replace(dst, old)
        os.replace(tmp, dst)
        remove(old)
    else:
        os.replace(tmp, dst)
    fsync_dir(dst.parent)


def quantize_checkpoint(src, dst, config: QuantConfig | None = None, *, skip: str | None = DEFAULT_SKIP,
                        min_features: int = 16, backend: str = "auto", overwrite: bool = False,
                        progress: bool = True, follow_symlinks: bool = False,
                        bits_per_weight: float | None = None, client=None) -> dict:
    """Quantize every eligible 2-D weight of a checkpoint (see :func:`should_quantize`);
    copy the rest unchanged. Peak memory is a few times the largest tensor.

    ``bits_per_weight``: a budget over the quantized weights; each one's group size and outlier
    budget are then chosen for it (:mod:`eqcore.budget`; ``config`` gives everything else).
    ``client``: a ``dask.distributed.Client``; its workers then quantize the tensors (read from
    the input by memory map, so they must see the same files) and this process writes the
    output, bit-identical to a run without it (:mod:`eqcore.io.distributed`; ``backend``
    "auto" is resolved on each worker).
    Returns ``{"tensors": n, "weights": count, "bits_per_weight": achieved, exactly as stored}``,
    and with a client ``"workers": {address: {"tasks", "seconds"}}`` too.
    """
    config = config or QuantConfig()
    if client is None:
        backend = backends.for_files(backend)
    elif backend not in backends.CHOICES:
        raise ValueError(f"backend must be one of {backends.CHOICES}, got {backend!r}")
    pattern = compile_skip(skip)
    configs = None
    if bits_per_weight is not None:
        check_output(Path(src), Path(dst), overwrite)  # before minutes of planning, not after
        configs = _plan(src, config, pattern, min_features, bits_per_weight, backends.for_files(backend),
                        progress, follow_symlinks)
    done = {"tensors": 0, "weights": 0, "bytes": 0}

    def config_for(name):
        return config if configs is None else configs[name]

    def wanted(name, dtype, shape):
        return should_quantize(name, dtype, shape, pattern, min_features)

    remote = None
    if client is not None:
        from .distributed import RemoteQuantizer

        remote = RemoteQuantizer(client, backend, config_for, wanted)

    def one(name, value):
        if isinstance(value, QuantizedTensor):
            raise ValueError("is already quantized; quantize the original checkpoint")
        if not wanted(name, value.dtype, value.shape):
            return value, {}
        qt, sums = quantize_rows(value, config_for(name), backend) if remote is None else remote.take(name)
        done["tensors"] += 1
        done["weights"] += value.size
        done["bytes"] += qt.nbytes
        return qt, {"rel_error": combine_errors(sums)}

    try:
        _convert(src, dst, one, command="quantize", overwrite=overwrite, progress=progress,
                 follow_symlinks=follow_symlinks, on_start=None if remote is None else remote.start,
                 mmap=remote is not None)
    finally:
        if remote is not None:
            remote.close()
    out = {"tensors": done["tensors"], "weights": done["weights"],
           "bits_per_weight": 8.0 * done["bytes"] / done["weights"] if done["weights"] else None}
    if remote is not None:
        out["workers"] = remote.summary()
    return out


def _plan(src, config, pattern, min_features, bits_per_weight, backend, progress, follow_symlinks) -> dict:
    """Each eligible tensor's configuration for the bits budget, from memory-mapped samples."""
    from ..budget import plan

    source = scan(Path(src), follow_symlinks)
    readers = [SafetensorsReader(source.path(s), mmap=True) for s in source.shards]
    try:
        weights = {}
        for r in readers:
            qmeta = quantized_names(r)
            for name in entry_names(r):
                if name in qmeta:
                    continue
                dtype, shape = r.info(name)
                if should_quantize(name, dtype, shape, pattern, min_features):
                    if name in weights:
                        raise ValueError(f"tensor {name!r} is in two shards")
                    weights[name] = r.get(name)
        with tqdm(total=len(weights), unit="tensor", desc="budget", disable=not progress) as bar:
            return plan(weights, bits_per_weight, config, backend=backend, progress=lambda name: bar.update())
    finally:
        for r in readers:
            r.close()


def dequantize_checkpoint(src, dst, dtype=None, *, backend: str = "auto", overwrite: bool = False,
                          progress: bool = True, follow_symlinks: bool = False, allow_none: bool = False,
                          all_floats: bool = False) -> None:
    """Write a plain safetensors checkpoint any runtime can load: every quantized weight
    dense in ``dtype`` (default: its original dtype), other tensors unchanged (or, with
    ``all_floats``, every other floating-point tensor cast to ``dtype`` too). A checkpoint
    without quantized tensors is refused unless ``allow_none``."""
    dtype = None if dtype is None else weight_dtype(dtype)
    if all_floats and dtype is None:
        raise ValueError("all_floats needs a dtype")
    backend = backends.for_files(backend)
    be = backends.get(backend)

    def one(name, value):
        if isinstance(value, QuantizedTensor):
            return dequantize(value.map_arrays(be.asarray), dtype, backend=backend), {}
        if all_floats and value.dtype in WEIGHT_DTYPES.values():
            return saturate(value, dtype), {}
        return value, {}

    _convert(src, dst, one, command="dequantize", overwrite=overwrite, progress=progress,
             follow_symlinks=follow_symlinks, need_quantized=not allow_none)


def inspect_totals(rows: list[dict]) -> dict:
    """Totals over :func:`inspect_checkpoint` rows: the number of quantized tensors and their
    weights, their bits/weight and outlier fraction (over all their weights). There is no total
    relative error: per-tensor errors do not add up without the tensors' norms."""
    q = [r for r in rows if r["bits"] is not None]
    n = sum(math.prod(r["shape"]) for r in q)
    out = {"quantized": len(q), "weights": n, "bits_per_weight": None, "outlier_fraction": None, "rel_error": None}
    if n:
        out["bits_per_weight"] = sum(r["bits_per_weight"] * math.prod(r["shape"]) for r in q) / n
        out["outlier_fraction"] = sum(r["outlier_fraction"] * math.prod(r["shape"]) for r in q) / n
    return out


def inspect_checkpoint(path, against=None) -> list[dict]:
    """One row per tensor: name, shape, dtype, bits, bits/weight, outlier fraction, rel_error.

    rel_error comes from the file's metadata, or is recomputed against the original
    checkpoint ``against`` when given (whose tensors must have the same shapes).
    """
    rows = []
    originals = {}
    readers = []
    try:
        if against is not None:
            a = scan(against)
            for shard in a.shards:
                r = SafetensorsReader(a.path(shard))
                readers.append(r)
                originals.update({k: r for k in r.keys()})
        source = scan(path)
        for shard in source.shards:
            reader = SafetensorsReader(source.path(shard))
            readers.append(reader)
            qmeta = quantized_names(reader)
            if not qmeta and VERSION_KEY not in reader.metadata:
                raise ValueError(f"{source.path(shard)} is not an eqcore-quantized file")
            for name in entry_names(reader):
                v = read_entry(reader, name, qmeta)
                row = {"name": name, "shape": tuple(v.shape), "dtype": str(v.dtype)}
                if isinstance(v, QuantizedTensor):
                    rel = qmeta[name].get("rel_error")
                    if name in originals:
                        orig = originals[name].get(name)
                        if tuple(orig.shape) != v.shape:
                            raise ValueError(f"tensor {name!r} has shape {v.shape} here but {tuple(orig.shape)} in {against}")
                        rel = relative_error(dequantize(v, np.float32), orig)
                    row.update(bits=v.bits, group_size=v.group_size, bits_per_weight=v.bits_per_weight,
                               outlier_fraction=v.outlier_fraction, rel_error=rel)
                else:
                    row.update(bits=None, bits_per_weight=8.0 * v.dtype.itemsize, outlier_fraction=None, rel_error=None)
                rows.append(row)
    finally:
        for r in readers:
            r.close()
    return rows
