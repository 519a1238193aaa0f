"""Checkpoint folders on disk: what a source holds, and where an output may go.

A source is one ``.safetensors`` file, or a folder: its shards (the files its
``model.safetensors.index.json`` names, else every regular ``*.safetensors`` file in the
tree), and the rest of the tree (config, tokenizer, sub-folders), copied unchanged. Symbolic
links that stay inside the folder are recreated as links; links that leave it are refused
unless ``follow_symlinks`` (then what they point to is copied). FIFOs, sockets and devices
are skipped with a warning, never opened.

An output never overlaps its input, and an existing output is only replaced (``overwrite``)
when it is an earlier eqcore output (a file marked in its metadata, or a folder whose
manifest lists everything in it) or an empty file or folder.
"""
from __future__ import annotations

import dataclasses
import json
import os
import stat
import warnings
from pathlib import Path, PurePosixPath

INDEX = "model.safetensors.index.json"
MANIFEST = ".eqcore-manifest.json"


class OutputExistsError(FileExistsError):
    """The output path exists and replacing it was not asked for."""

    def __init__(self, path):
        super().__init__(f"{path} exists; pass overwrite=True to replace it (only an earlier eqcore output "
                         "or an empty file or folder is ever replaced)")
        self.path = str(path)


def is_within(path: Path, root: Path) -> bool:
    """True when resolved ``path`` is ``root`` or lies under it."""
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


@dataclasses.dataclass
class Source:
    """What a checkpoint holds. Paths are relative to ``root`` (POSIX style)."""

    root: Path
    is_file: bool
    shards: list[str]
    index: dict | None = None
    others: list[str] = dataclasses.field(default_factory=list)
    links: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, relative target)

    def path(self, rel: str) -> Path:
        return self.root / rel


def _load_json_no_duplicates(path: Path):
    def pairs(items):
        seen = {}
        for k, v in items:
            if k in seen:
                raise ValueError(f"{path}: names {k!r} twice")
            seen[k] = v
        return seen

    try:
        return json.loads(path.read_text(), object_pairs_hook=pairs)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not a valid safetensors index ({e})") from None


def _safe_relative(rel, root: Path, where: str) -> str:
    """``rel`` as a normalised relative path that stays inside ``root``; ValueError otherwise."""
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"{where}: shard path {rel!r} is not a file name")
    p = PurePosixPath(rel)
    if p.is_absolute() or os.path.isabs(rel) or ".." in p.parts:
        raise ValueError(f"{where}: shard {rel!r} lies outside the checkpoint folder")
    return str(p)


def read_index(root: Path) -> dict:
    """The checked index of a folder: a non-empty weight_map of tensor -> relative shard path."""
    path = root / INDEX
    index = _load_json_no_duplicates(path)
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict):
        raise ValueError(f"{path}: not a valid safetensors index (no weight_map object)")
    if not wm:
        raise ValueError(f"{path}: empty weight_map; the index names no tensor")
    index["weight_map"] = {k: _safe_relative(v, root, str(path)) for k, v in wm.items()}
    return index


def _outside(rel: str, real: str) -> ValueError:
    return ValueError(f"{rel} is a symlink to {real}, outside the checkpoint folder; eqcore does not "
                      "follow links out of a model folder (pass --follow-symlinks / follow_symlinks=True "
                      "to copy what it points to)")


def scan(src, follow_symlinks: bool = False) -> Source:
    """Shards, index, other files and links of a checkpoint file or folder."""
    src = Path(src)
    if not os.path.lexists(src):
        raise FileNotFoundError(f"no such file or folder: {src}")
    if not src.is_dir():
        if not src.is_file():
            raise ValueError(f"{src} is not a regular file or folder")
        return Source(src.parent, True, [src.name])
    root = Path(os.path.realpath(src))
    index = read_index(root) if (root / INDEX).is_file() else None
    files, links = [], []
    for folder, dirs, names in os.walk(root, followlinks=follow_symlinks):
        here = Path(folder)
        for name in sorted(dirs) + sorted(names):
            full = here / name
            rel = full.relative_to(root).as_posix()
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                real = os.path.realpath(full)
                if is_within(Path(real), root):
                    if not follow_symlinks or not os.path.exists(real):
                        links.append((rel, os.path.relpath(real, os.path.realpath(here))))
                        if name in dirs:
                            dirs.remove(name)
                        continue
                elif not follow_symlinks:
                    raise _outside(rel, real)
                elif not os.path.exists(real):
                    warnings.warn(f"{rel}: dangling symlink, skipped", stacklevel=2)
                    continue
                st = os.stat(full)
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                warnings.warn(f"{rel}: not a regular file (FIFO, socket or device), skipped", stacklevel=2)
                continue
            files.append(rel)
    if index is not None:
        shards = sorted(set(index["weight_map"].values()))
        present = set(files)
        missing = [s for s in shards if s not in present]
        if missing:
            raise FileNotFoundError(f"{root / INDEX} names shards that are not regular files in the folder: {missing}")
        extra = [f for f in files if f.endswith(".safetensors") and f not in shards]
        for f in extra:
            warnings.warn(f"{f} is not named by {INDEX}; copied unchanged", stacklevel=2)
    else:
        shards = [f for f in files if f.endswith(".safetensors")]
        if not shards:
            raise FileNotFoundError(f"{src} holds no .safetensors files")
    others = [f for f in files if f not in shards and f not in (INDEX, MANIFEST)]
    return Source(root, False, shards, index, others, links)


# -- outputs -----------------------------------------------------------------------------
def _tree_entries(folder: Path) -> set[str]:
    out = set()
    for here, dirs, names in os.walk(folder):
        for name in dirs + names:
            out.add((Path(here) / name).relative_to(folder).as_posix())
    return out


def _is_own_file(path: Path) -> bool:
    from .fileformat import OUTPUT_KEY, VERSION_KEY
    from .safetensors import SafetensorsReader

    try:
        with SafetensorsReader(path) as r:
            return OUTPUT_KEY in r.metadata or VERSION_KEY in r.metadata
    except (ValueError, OSError):
        return False


def check_replaceable(dst: Path) -> None:
    """ValueError unless ``dst`` is an earlier eqcore output or an empty file or folder."""
    refuse = (f"refusing to replace {dst}: it is not an earlier eqcore output (eqcore only replaces "
              "its own outputs, or empty files and folders)")
    if dst.is_symlink():
        raise ValueError(f"refusing to replace {dst}: it is a symbolic link")
    if dst.is_file():
        if dst.stat().st_size and not _is_own_file(dst):
            raise ValueError(refuse)
        return
    if not dst.is_dir():
        raise ValueError(refuse)
    entries = _tree_entries(dst)
    if not entries:
        return
    try:
        manifest = json.loads((dst / MANIFEST).read_text())
        listed = set(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(refuse) from None
    for rel in list(listed):  # the folders that hold listed files are ours too
        listed.update(str(p) for p in PurePosixPath(rel).parents if str(p) != ".")
    extra = sorted(entries - listed - {MANIFEST})
    if extra:
        raise ValueError(f"refusing to replace {dst}: it is an earlier eqcore output but now also holds "
                         f"{extra[:5]}, which eqcore did not write")


def check_output(src: Path, dst: Path, overwrite: bool) -> None:
    """Refuse outputs that overlap the input, and existing outputs eqcore may not replace."""
    s, d = Path(os.path.realpath(src)), Path(os.path.realpath(dst))
    if d == s:
        raise ValueError("output must differ from input (the input is never overwritten)")
    if src.is_dir() and is_within(d, s):
        raise ValueError(f"the output {dst} lies inside the input folder {src}; choose a path outside it")
    if os.path.lexists(dst):
        if is_within(s, d):
            raise ValueError(f"{dst} contains the input {src}; refusing to replace it")
        if not overwrite:
            raise OutputExistsError(dst)
        check_replaceable(dst)


def write_manifest(folder: Path, command: str, src: Path) -> None:
    from .._version import __version__
    from .atomic import create_file

    files = sorted(p for p in _tree_entries(folder) if not (folder / p).is_dir() or (folder / p).is_symlink())
    with create_file(folder / MANIFEST) as f:
        f.write(json.dumps({"eqcore": __version__, "command": command, "source": str(src), "files": files},
                           indent=1).encode())
