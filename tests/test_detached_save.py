"""The detached writers of a stop checkpoint (`prior_dist/runs/detached.py`), without a
launcher: real forks, real files. End to end (the launcher's SIGKILL): tests/test_pretrain.py."""

import hashlib
import json
import os
import socket
import subprocess

import torch

from prior_dist.runs.checkpoints import damaged_files, remove_partial, wait_for_writers
from prior_dist.runs.detached import (
    HostSnapshot,
    failed_writers,
    live_writers,
    start_writer,
    wait_until,
)
from prior_dist.runs.lock import process_running, process_start


def test_the_last_writer_completes_the_checkpoint_with_every_ranks_records(tmp_path):
    directory = tmp_path / "checkpoints" / "step00000004"
    directory.mkdir(parents=True)
    marker = {"step": 4, "world_size": 2}
    files = [{"a.pt": b"rank zero", "r0.json": b"{}"}, {"b.pt": b"rank one" * 1000}]
    pids = [start_writer(directory, files[r], r, 2, marker) for r in range(2)]
    wait_until(lambda: not any(map(process_running, pids)), timeout_s=120)
    written = json.loads((directory / "complete.json").read_text())
    assert written["step"] == 4 and sorted(written["files"]) == ["a.pt", "b.pt", "r0.json"]
    assert written["files"]["b.pt"] == {
        "bytes": 8000,
        "sha256": hashlib.sha256(b"rank one" * 1000).hexdigest(),
    }
    assert damaged_files(directory) == []
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["a.pt", "b.pt", "complete.json", "r0.json"]  # nothing of the writers left


def _writer_file(directory, rank: int, pid: int) -> None:
    """What a writer names itself with, for process `pid` of this host."""
    owner = {"host": socket.gethostname(), "pid": pid, "process_start": process_start(pid)}
    (directory / f".writer-rank{rank}.json").write_text(json.dumps(owner))


def test_a_run_waits_for_a_live_writer_and_never_removes_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    directory = run / "checkpoints" / "step00000002"
    directory.mkdir(parents=True)
    writer = subprocess.Popen(["sleep", "3"])
    _writer_file(directory, 1, writer.pid)
    assert live_writers(directory) and remove_partial(run) == [] and directory.is_dir()
    logged = []
    wait_for_writers(run, log=logged.append, poll_s=0.1)  # returns once `sleep` has ended
    assert writer.poll() is not None or not process_running(writer.pid)
    assert logged == [
        f"waiting for the writers still saving {directory}: pid {writer.pid} on "
        f"{socket.gethostname()}, started None"
    ]
    writer.wait()
    _writer_file(directory, 1, 2**22 + 7)  # a writer that died: no such process
    assert live_writers(directory) == [] and remove_partial(run) == ["step00000002"]


def test_a_writer_that_cannot_write_says_why_and_completes_nothing(tmp_path):
    directory = tmp_path / "step00000002"
    directory.mkdir()
    (directory / "a.pt").mkdir()  # its file cannot be renamed over a directory
    pid = start_writer(directory, {"a.pt": b"y"}, 0, 1, {"step": 2})
    wait_until(lambda: not process_running(pid), timeout_s=120)
    [failure] = failed_writers(directory)
    assert failure.startswith(f"rank 0's writer (pid {pid}): IsADirectoryError"), failure
    assert not (directory / "complete.json").exists() and not live_writers(directory)


def test_the_snapshot_keeps_what_deepspeed_would_write_in_memory(tmp_path):
    class Engine:
        def __init__(self):
            self.saved = []

        def save(self, state, path):
            self.saved.append(path)

        def makedirs(self, path, exist_ok=False):
            os.makedirs(path, exist_ok=exist_ok)

    inner = Engine()
    snapshot = HostSnapshot(inner)
    snapshot.makedirs(tmp_path / "d", exist_ok=True)  # delegated
    snapshot.save({"w": torch.arange(3.0)}, str(tmp_path / "d" / "m.pt"))
    assert inner.saved == [] and (tmp_path / "d").is_dir()
    data = snapshot.files[str(tmp_path / "d" / "m.pt")]
    (tmp_path / "m.pt").write_bytes(data)
    loaded = torch.load(tmp_path / "m.pt", weights_only=True, mmap=True)
    assert torch.equal(loaded["w"], torch.arange(3.0))
