"""The run lock: one live run per run directory; stale locks are taken over with a reason."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from prior_dist.runs.lock import LOCK, RunDirInUse, RunLock


def _write_lock(run_dir, **owner):
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": 1, "process_start": "0", "started": "then"}
    (run_dir / LOCK).write_text(json.dumps({**record, **owner}))
    return run_dir / LOCK


def test_a_live_owner_keeps_the_directory_and_release_frees_it(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunDirInUse, match=f"pid {os.getpid()} on {socket.gethostname()}"):
        RunLock(tmp_path).acquire()
    assert first.owned()
    first.release()
    assert not (tmp_path / LOCK).exists()
    second = RunLock(tmp_path)
    second.acquire()  # free again
    second.release()


def test_a_lock_whose_process_ended_is_taken_over_with_a_reason(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lock(tmp_path, pid=dead.pid)
    lines = []
    lock = RunLock(tmp_path)
    lock.acquire(lines.append)
    assert lock.owned() and "its process has ended" in lines[0] and f"pid {dead.pid}" in lines[0]
    lock.release()


def test_a_reused_pid_is_not_the_owner(tmp_path):
    _write_lock(tmp_path, pid=os.getpid(), process_start="1")  # our pid, another process's start
    lines = []
    RunLock(tmp_path).acquire(lines.append)
    assert "its process has ended" in lines[0]


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _write_lock(tmp_path, pid=os.getpid(), process_start=None, slurm_job_id="4242")
    lines = []
    RunLock(tmp_path).acquire(lines.append)
    assert "SLURM job (4242, requeued)" in lines[0]


def test_another_host_s_lock_is_live_until_its_heartbeat_stops(tmp_path):
    path = _write_lock(tmp_path, host="node-elsewhere", pid=7, slurm_job_id="17")
    with pytest.raises(RunDirInUse, match="pid 7 on node-elsewhere, SLURM job 17"):
        RunLock(tmp_path).acquire()
    old = time.time() - 3600
    os.utime(path, (old, old))
    lines = []
    RunLock(tmp_path).acquire(lines.append)
    assert "no heartbeat for" in lines[0]


def test_an_unreadable_lock_is_stale(tmp_path):
    tmp_path.joinpath(LOCK).write_text("{not json")
    lines = []
    RunLock(tmp_path).acquire(lines.append)
    assert "unreadable" in lines[0]


RACE = """
import sys, time
from pathlib import Path
from prior_dist.runs.lock import RunDirInUse, RunLock

run_dir, sync, me, n = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])


def wait_for(prefix):  # every contender at the same point (bounded: a hung peer fails the test)
    deadline = time.time() + 300
    while len(list(sync.glob(prefix + "*"))) < n and time.time() < deadline:
        time.sleep(0.001)


(sync / f"ready{me}").touch()
wait_for("ready")
try:
    RunLock(run_dir).acquire(lambda _: None)
    print("won", flush=True)
except RunDirInUse:
    print("refused", flush=True)
(sync / f"done{me}").touch()
wait_for("done")  # the winner holds the lock until every contender has tried
"""


def test_of_runs_starting_together_exactly_one_wins(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir, sync = tmp_path / "run", tmp_path / "sync"
    sync.mkdir()
    _write_lock(run_dir, pid=dead.pid)  # a stale lock that every contender wants to clear
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(run_dir), str(sync), str(i), "4"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    outcomes = sorted(p.communicate(timeout=600)[0].strip() for p in procs)
    assert outcomes == ["refused", "refused", "refused", "won"]
