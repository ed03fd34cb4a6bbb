"""Noticing that the `deepspeed` launcher this rank runs under has gone.

On one node, `deepspeed` (the runner) starts `python -m deepspeed.launcher.launch`, which starts
the ranks. The runner installs no signal handler there: `kill -TERM <runner pid>` ends it at
once and the ranks would train on, orphaned, with nobody left to stop them. Each rank therefore
watches the runner from a thread and, when it is gone, asks the training loop to checkpoint and
stop at the next step boundary, exactly as for SIGTERM. (`launch` forwards its own SIGTERM to
the ranks; a group signal reaches the ranks directly.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import psutil

_LAUNCH_MODULE = "deepspeed.launcher.launch"


def deepspeed_runner() -> tuple[psutil.Process, psutil.Process] | None:
    """(the per-node `launch` process, the process that started it) when this process is a rank
    started by the DeepSpeed launcher; otherwise None (torchrun, srun, a plain python)."""
    try:
        launch = psutil.Process().parent()
        if launch is None or _LAUNCH_MODULE not in launch.cmdline():
            return None
        runner = launch.parent()
        if runner is None or runner.pid <= 1:
            return None
        return launch, runner
    except psutil.Error:
        return None


def runner_gone(launch: psutil.Process, runner: psutil.Process) -> bool:
    """True once the runner has exited: `launch` was re-parented (that happens as the runner
    exits, before anyone reaps it), or the runner is gone or a zombie."""
    try:
        if launch.ppid() != runner.pid:
            return True
        return not runner.is_running() or runner.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def watch_runner(on_gone: Callable[[str], None], interval_s: float = 1.0) -> bool:
    """Call `on_gone(reason)` once from a daemon thread when the `deepspeed` runner above this
    rank exits; returns whether there is one to watch."""
    found = deepspeed_runner()
    if found is None:
        return False
    launch, runner = found

    def watch() -> None:
        while not runner_gone(launch, runner):
            time.sleep(interval_s)
        on_gone(f"the deepspeed launcher (pid {runner.pid}) exited")

    threading.Thread(target=watch, name="prior-dist-launcher-watch", daemon=True).start()
    return True
