"""Atomic outputs: work goes to a partial path beside the destination and is renamed into place.

Partial paths are named ``.<name>.eqcore-partial-<host>-<pid>-<token>`` (and replaced outputs
``.<name>.eqcore-old-...``), so a later run on the same destination recognises the leftovers
of a killed run (same host, process gone) and removes them. New files and folders get the
user's umask, as ``cp`` and ``mkdir`` would give them.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import socket

_TAG = re.compile(r"\.eqcore-(?:partial|old)-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _host() -> str:
    return socket.gethostname().replace("/", "_") or "localhost"


def partial_path(path, kind: str = "partial") -> str:
    """A fresh hidden sibling of ``path`` for work in progress (``kind`` "partial" or "old")."""
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}.eqcore-{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(path) -> list[str]:
    """Delete the partial outputs of ``path`` left by killed eqcore runs on this host; their names."""
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    prefix = f".{name}.eqcore-"
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        m = _TAG.search(entry[len(name) + 1:])
        if not m or m["host"] != _host():
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _alive(pid):  # ours, or a run still going
            continue
        full = os.path.join(folder, entry)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            try:
                os.unlink(full)
            except OSError:
                continue
        removed.append(entry)
    return removed


def create_file(path):
    """Open a new file for writing (exclusive create, mode 0666 minus the umask)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    return os.fdopen(fd, "wb")


def remove(path) -> None:
    """Delete a file or folder tree if it exists (no error if it does not)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        try:
            os.unlink(path)
        except OSError:
            pass


def fsync_dir(folder) -> None:
    """Make a rename in ``folder`` durable (best effort; not every platform allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
