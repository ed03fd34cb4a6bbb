"""Stop checkpoints that outlive the launcher: written by a process outside its process tree.

DeepSpeed's per-node launcher answers a SIGTERM by terminating each rank and SIGKILLing it 30 s
later, whatever it is doing; a paper-scale save on shared storage can take longer. A save made
to stop is therefore split in two:
1. every rank serializes what it would write into host memory (`HostSnapshot` stands in for
   DeepSpeed's checkpoint engine; `torch.save` into bytes), which takes the time of a copy;
2. a writer process started with a double fork and its own session (so it is nobody's child:
   the launcher's kill of the process tree does not reach it) puts the bytes on disk, each file
   atomically, records their sizes and SHA-256, and the last rank's writer to finish writes
   `complete.json` from every rank's records.
The rank waits for its writer as long as it is allowed to live, so nothing changes where nobody
kills it. Each writer names itself in `stepN/.writer-rankR.json` (host, pid, start time,
heartbeat) until it is done; a run starting in the directory waits for live writers before it
chooses a checkpoint, and never removes a checkpoint a live writer is completing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from prior_dist.atomic import write_bytes
from prior_dist.runs.layout import MARKER
from prior_dist.runs.lock import (
    HEARTBEAT_S,
    describe,
    owner_record,
    process_running,
    stale_reason,
)

WRITER_PREFIX = ".writer-rank"
RECORDS_PREFIX = ".records-rank"
FAILED_PREFIX = ".failed-rank"
_CLAIM = ".marking"


class HostSnapshot:
    """DeepSpeed's checkpoint engine for one save, except that `save` serializes each state
    into host memory (`files`: path -> bytes) instead of writing it."""

    def __init__(self, inner):
        self.inner = inner
        self.files: dict[str, bytes] = {}

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def save(self, state_dict, path: str) -> None:
        buffer = io.BytesIO()
        zipfile = getattr(self.inner, "zipfile_serialization", True)
        torch.save(state_dict, buffer, _use_new_zipfile_serialization=zipfile)
        self.files[str(path)] = buffer.getvalue()


def snapshot_deepspeed_save(engine, save: Callable[[], None]) -> dict[str, bytes]:
    """Run `save` (which calls `engine.save_checkpoint`) with DeepSpeed's files kept in memory."""
    snapshot = HostSnapshot(engine.checkpoint_engine)
    engine.checkpoint_engine = snapshot
    try:
        save()
    finally:
        engine.checkpoint_engine = snapshot.inner
    return snapshot.files


def write_file(path: Path, data: bytes) -> dict:
    """One file of the checkpoint on disk (atomically); its record for `complete.json`."""
    write_bytes(path, data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _beat(path: Path, done: threading.Event) -> None:
    while not done.wait(HEARTBEAT_S):
        try:
            os.utime(path)
        except OSError:
            return


def _write_all(
    directory: Path,
    files: dict[str, bytes],
    rank: int,
    world: int,
    marker: dict,
    on_complete: Callable[[], None],
) -> None:
    """The writer's work: this rank's files, its records, and the marker if it is the last."""
    records = {name: write_file(directory / name, data) for name, data in files.items()}
    write_bytes(directory / f"{RECORDS_PREFIX}{rank}.json", json.dumps(records).encode())
    parts = [directory / f"{RECORDS_PREFIX}{r}.json" for r in range(world)]
    if not all(p.is_file() for p in parts):
        return  # a later writer completes the checkpoint
    try:  # of writers finishing together, one writes the marker
        os.close(os.open(directory / _CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    merged = {}
    for part in parts:
        merged.update(json.loads(part.read_text()))
    marker = dict(marker, files=dict(sorted(merged.items())))
    write_bytes(directory / MARKER, json.dumps(marker, indent=2).encode())
    for path in [*parts, directory / _CLAIM]:
        path.unlink(missing_ok=True)
    on_complete()


def _writer_main(directory, files, rank, world, marker, on_complete) -> None:
    """The detached writer (a grandchild in a session of its own): never returns."""
    code = 0
    me = directory / f"{WRITER_PREFIX}{rank}.json"
    done = threading.Event()
    try:
        write_bytes(me, json.dumps(owner_record("writer")).encode())
        threading.Thread(target=_beat, args=(me, done), daemon=True).start()
        _write_all(directory, files, rank, world, marker, on_complete)
    except BaseException as err:  # the writer has nobody to raise to: leave the reason
        code = 1
        try:
            text = f"rank {rank}'s writer (pid {os.getpid()}): {type(err).__name__}: {err}"
            write_bytes(directory / f"{FAILED_PREFIX}{rank}.txt", text.encode())
        except BaseException:
            pass
    finally:
        done.set()
        me.unlink(missing_ok=True)
        os._exit(code)


def start_writer(
    directory: Path,
    files: dict[str, bytes],
    rank: int,
    world: int,
    marker: dict,
    on_complete: Callable[[], None] = lambda: None,
) -> int:
    """Start the detached writer of this rank's `files` (name -> bytes) into `directory`;
    returns its pid once its `.writer-rankR.json` exists."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the intermediate: starts the writer and leaves it to init
        os.close(read)
        os.setsid()
        writer = os.fork()
        if writer == 0:
            os.close(write)
            _detach_descriptors()
            _writer_main(directory, files, rank, world, marker, on_complete)
        os.write(write, str(writer).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        pid = int(pipe.read() or -1)
    os.waitpid(child, 0)
    named = directory / f"{WRITER_PREFIX}{rank}.json"
    wait_until(lambda: named.is_file() or not process_running(pid))
    return pid


def _detach_descriptors() -> None:
    """The writer keeps no descriptor of the rank's: not its sockets (the process group's
    store would stay bound), not the launcher's output pipes (its readers would wait)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(3, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 4096)


def wait_until(ready: Callable[[], bool], poll_s: float = 0.05, timeout_s: float = 0) -> None:
    """Poll `ready` until it holds (`timeout_s` > 0: at most that long, then TimeoutError)."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if timeout_s and time.monotonic() > deadline:
            raise TimeoutError(f"not ready after {timeout_s:.0f} s")
        time.sleep(poll_s)


def live_writers(directory: Path) -> list[str]:
    """The writers still completing checkpoint `directory`, described (none: [])."""
    found = []
    for path in sorted(directory.glob(f"{WRITER_PREFIX}*.json")):
        try:
            owner = json.loads(path.read_text())
            age = time.time() - path.stat().st_mtime
        except (OSError, ValueError):
            continue  # finished (removed) meanwhile, or half-written: its writer is starting
        if stale_reason(owner, age) is None:
            found.append(describe(owner))
    return found


def failed_writers(directory: Path) -> list[str]:
    return [p.read_text() for p in sorted(directory.glob(f"{FAILED_PREFIX}*.txt"))]
