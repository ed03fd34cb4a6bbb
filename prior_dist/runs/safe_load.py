"""Reading torch files a user may have been handed (run directories, checkpoints) without ever
running code: weights-only unpickling, with only the few DeepSpeed types its own files hold
allowed besides tensors and plain data."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch


class UnsafeFileError(ValueError):
    """A torch file holds objects other than tensors and plain data; it was not loaded."""


def _deepspeed_types() -> list:
    # deepspeed takes seconds to import; only its optimizer-state files need these types.
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


# numpy arrays inside the per-rank RNG state of checkpoints written before it moved to JSON.
_NUMPY_CORE = getattr(np, "_core", None) or np.core
_NUMPY_TYPES = [np.ndarray, np.dtype, np.dtypes.UInt32DType, _NUMPY_CORE.multiarray._reconstruct]


def safe_torch_load(path: str | Path, deepspeed_types: bool = False, mmap: bool = False):
    """`torch.load(path, weights_only=True)` on the CPU; a file that needs anything else to
    unpickle is refused with `UnsafeFileError` naming it, and nothing in it runs."""
    allowed = _deepspeed_types() if deepspeed_types else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UnsafeFileError(
            f"{path}: refused: it holds objects other than tensors and plain data, and loading "
            f"it could run code ({reason[:200]}). Only load checkpoints you trust with other "
            "tools."
        ) from None


def safe_legacy_rank_state(path: Path) -> dict:
    """A per-rank state file of the older `.pt` format (numpy arrays allowed, nothing else)."""
    with torch.serialization.safe_globals(_NUMPY_TYPES):
        return safe_torch_load(path)


def check_torch_files(directory: Path, recursive: bool = False) -> None:
    """Every `*.pt` in a checkpoint directory (and its subdirectories when `recursive`) passes
    a weights-only load before DeepSpeed (whose own loader unpickles everything) reads it.
    Memory-mapped: tensors are not read."""
    found = Path(directory).rglob("*.pt") if recursive else Path(directory).glob("*.pt")
    for path in sorted(found):
        try:
            safe_torch_load(path, deepspeed_types=True, mmap=True)
        except UnsafeFileError:
            raise
        except (RuntimeError, OSError, EOFError, ValueError) as err:
            reason = " ".join(str(err).split())[:200] or type(err).__name__
            raise ValueError(
                f"{path}: unreadable torch file (truncated or corrupted?): {reason}"
            ) from err
