"""Process-group start-up for the DeepSpeed launcher, torchrun and srun alike."""

from __future__ import annotations

import errno
import os
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def adopt_slurm_environment() -> None:
    """Under `srun` (no RANK set), take rank, world size and local rank from SLURM."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")


def device_for_local_rank() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def init_process_group(device: torch.device, timeout_s: float) -> None:
    """NCCL on CUDA, gloo on CPU, with a bounded collective timeout (a dead peer cannot hang us)."""
    # deepspeed takes seconds to import; only a starting run needs its accelerator set-up.
    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    check_master_port()
    backend = "nccl" if device.type == "cuda" else "gloo"
    deepspeed.init_distributed(
        dist_backend=backend, auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s)
    )
    release_shm_names()


def check_master_port() -> None:
    """On rank 0, which opens the rendezvous store (unless torchrun's agent holds it), fail at
    once when MASTER_PORT is taken (say, by another run on the default 29500) rather than let
    every rank wait out the store's timeout and blame a dead peer."""
    if os.environ["RANK"] != "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return
    port = int(os.environ["MASTER_PORT"])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise
            raise ValueError(
                f"port {port} is in use (another run on this machine?): pass --master_port "
                "to the launcher, or set MASTER_PORT"
            ) from None


def release_shm_names() -> list[str]:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer from /dev/shm.

    DeepSpeed's shm op creates `/dev/shm/deepspeed_allreduce_buffer_*_<addr>_<port>_<rank>`
    (about 66 MB per rank) and never removes it, so every run leaks RAM until reboot. Once
    every rank has mapped its peers' buffers (the barrier), the names are no longer needed:
    the mappings outlive the unlink, and a killed run leaves nothing behind.
    """
    if not dist.is_initialized():
        return []
    dist.barrier()
    pattern = (
        f"deepspeed_allreduce_buffer_*_{os.environ['MASTER_ADDR']}_"
        f"{os.environ['MASTER_PORT']}_{dist.get_rank()}"
    )
    removed = []
    for path in Path("/dev/shm").glob(pattern):
        path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed
