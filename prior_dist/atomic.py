"""Files that appear whole or not at all: the one place in the package that renames into place.

A file is written under a temporary name beside its target, flushed and fsynced, renamed over
the target, and the directory is fsynced so that the rename itself survives a crash; a write
that fails leaves no temporary file behind. `publish` does the same for a file or directory
that something else wrote (a tokenizer's `save_pretrained`, DeepSpeed's converter). Everything
the package writes for others to find goes through here (shards and their indexes, manifests,
checkpoint records, configs, vocabularies, model cards, results); `tests/test_layout.py`
keeps `os.replace` and `os.rename` out of every other module. `file_lock` lets one process at
a time make what the others would make the same (phantom shards, a vocabulary, an index).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a platform or file system that cannot open directories: best effort
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_sibling(path: Path) -> Path:
    """A name beside `path` for its content in the making (hidden, this process's own)."""
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A binary file to write that appears at `path` only whole (see the module)."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as handle:
        handle.write(data)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Path, obj: Any, indent: int = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def publish(tmp: Path, target: Path) -> None:
    """Rename the finished file or directory `tmp` (written by other code, beside `target`)
    to `target`, its contents fsynced first. A directory replaces only a missing or empty
    `target`."""
    tmp, target = Path(tmp), Path(target)
    for root, _, names in os.walk(tmp) if tmp.is_dir() else [(tmp.parent, [], [tmp.name])]:
        for name in names:
            with open(Path(root) / name, "rb") as handle:
                os.fsync(handle.fileno())
        if tmp.is_dir():
            _fsync_directory(Path(root))
    os.replace(tmp, target)
    _fsync_directory(target.parent)


@contextlib.contextmanager
def file_lock(target: Path) -> Iterator[None]:
    """Hold the exclusive lock on making `target` (the hidden `.NAME.lock` beside it, made when
    missing): processes that would make the same files (every rank of a node, nodes sharing
    the file system) wait for the first one and then find its work done. Where the lock cannot
    be made or the file system has no locks, everyone goes on: what they write is the same and
    goes through this module, so no reader sees a half-written file."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle = open(target.with_name(f".{target.name}.lock"), "a")
    except OSError:
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
