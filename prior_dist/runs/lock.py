"""The run lock: a run directory belongs to one training run at a time.

`RUN_DIR/LOCK` (JSON) names its owner: host, pid, the process's start time (so a reused pid is
not mistaken for the owner), when the run started and its SLURM job id. The owner refreshes the
file's modification time every `HEARTBEAT_S` from a background thread. A run that finds a lock:
- owned by a live run: refused with `RunDirInUse` (the CLI's exit 2), naming the owner;
- stale: taken over, with a line saying why. Stale means the owner's process is gone (same
  host), its heartbeat stopped `STALE_AFTER_S` ago (another host: its pid cannot be checked
  from here), or it is an earlier attempt of this same SLURM job (a requeue: SLURM runs one
  attempt of a job at a time).
Taking the lock is atomic: the owner's record is written to a private file and hard-linked to
`LOCK`, which fails when `LOCK` exists, so of two runs starting together exactly one wins; a
stale lock is removed under a breaker file (one contender at a time) and only if it is still
the lock judged stale. Readers (evaluate, export, visualize) never take it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from prior_dist.runs.layout import LOCK

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
BREAKER_STALE_S = 60.0


class RunDirInUse(ValueError):
    """The run directory is owned by another live run."""


def process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), or None if it is gone (a
    zombie, which nobody reaped yet, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name in () may hold spaces
    return None if fields[0] in ("Z", "X") else fields[19]  # fields 3 and 22


def process_running(pid: int) -> bool:
    """Whether `pid` is a running (not a zombie) process on this host."""
    return pid > 0 and process_start(pid) is not None


def owner_record(token: str) -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": process_start(os.getpid()),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "token": token,
    }


def describe(owner: dict) -> str:
    job = f", SLURM job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
    return f"pid {owner.get('pid')} on {owner.get('host')}{job}, started {owner.get('started')}"


def stale_reason(owner: dict, heartbeat_age_s: float) -> str | None:
    """Why a lock's owner is no longer running it, or None while it may be."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and owner.get("slurm_job_id") == job:
        return f"an earlier attempt of this SLURM job ({job}, requeued)"
    if owner.get("host") == socket.gethostname():
        start = process_start(int(owner.get("pid", -1)))
        if start is None or start != owner.get("process_start"):
            return "its process has ended"
        return None
    if heartbeat_age_s > STALE_AFTER_S:
        return f"no heartbeat for {heartbeat_age_s:.0f} s"
    return None


def _remove_if_older(path: Path, seconds: float) -> None:
    try:
        if time.time() - path.stat().st_mtime > seconds:
            path.unlink(missing_ok=True)
    except FileNotFoundError:
        pass


class RunLock:
    """Held by rank 0 of a training run from start-up to exit (`acquire`, `release`)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, log=print) -> None:
        """Take the lock or raise `RunDirInUse`; a stale one is taken over with a log line."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = self.path.with_name(f".{LOCK}.{self.token}")
        mine.write_text(json.dumps(owner_record(self.token), indent=2))
        try:
            while not self._link(mine):
                self._clear_stale(log)
        finally:
            mine.unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._beat, name="run-lock", daemon=True)
        self._thread.start()

    def _link(self, mine: Path) -> bool:
        try:
            os.link(mine, self.path)
        except FileExistsError:
            return False
        return True

    def _clear_stale(self, log) -> None:
        """Remove a stale lock (raising `RunDirInUse` when its owner is live). The removal runs
        under a breaker file that one contender at a time can create, and only if the lock is
        still the one judged stale: a contender that judged the old lock cannot remove the new
        lock another contender has meanwhile put in its place."""
        try:
            text = self.path.read_text()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return  # released meanwhile: try again
        try:
            owner = json.loads(text)
        except ValueError:
            owner = {}  # unreadable: not a lock a live run wrote (those are linked whole)
        reason = stale_reason(owner, age) if owner else "it is unreadable"
        if reason is None:
            raise RunDirInUse(
                f"run directory {self.path.parent} is in use by another run ({describe(owner)}); "
                "wait for it to end, stop it, or pass another --run-dir"
            )
        breaker = self.path.with_name(f".{LOCK}.breaking")
        try:
            os.close(os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            _remove_if_older(breaker, BREAKER_STALE_S)  # its creator died mid-way
            time.sleep(0.01)
            return
        try:
            if self.path.read_text() == text:
                self.path.unlink()
                log(f"run lock: taking over from {describe(owner)}: {reason}")
        except FileNotFoundError:
            pass
        finally:
            breaker.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if self.owned():
                os.utime(self.path)

    def owned(self) -> bool:
        try:
            return json.loads(self.path.read_text()).get("token") == self.token
        except (OSError, ValueError):
            return False

    def release(self) -> None:
        """Remove the lock if this run still owns it."""
        self._stop.set()
        if self.owned():
            self.path.unlink(missing_ok=True)
