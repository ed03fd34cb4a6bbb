"""Files a user may be handed (run directories, checkpoints) are never unpickled beyond tensors
and plain data: a pickle that would run code is refused, naming the file, and nothing runs."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch

from prior_dist.models import model_config
from prior_dist.runs import checkpoints
from prior_dist.runs.layout import MARKER, RESOLVED_CONFIG, legacy_rank_file, rank_files
from prior_dist.runs.safe_load import UnsafeFileError, check_torch_files, safe_torch_load
from tests.conftest import run_cli


class RunsCode:
    """Unpickling this creates a directory: the sign that loading ran code."""

    def __init__(self, witness: str):
        self.witness = witness

    def __reduce__(self):
        return (os.mkdir, (self.witness,))


def hostile_torch_file(path, witness) -> None:
    torch.save({"module": {"w": torch.zeros(1)}, "extra": RunsCode(str(witness))}, path)


def hostile_run(tmp_path):
    """A run directory whose only checkpoint's model states would run code when unpickled."""
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "step00000001"
    checkpoint.mkdir(parents=True)
    resolved = {
        "recipe": {"data": {"path": str(tmp_path / "shards")}},
        "model": model_config("tiny").to_dict(),
    }
    (run / RESOLVED_CONFIG).write_text(json.dumps(resolved))
    (checkpoint / MARKER).write_text(json.dumps({"step": 1, "world_size": 1, "zero_stage": 2}))
    witness = tmp_path / "code-ran"
    hostile_torch_file(checkpoint / "mp_rank_00_model_states.pt", witness)
    return run, checkpoint / "mp_rank_00_model_states.pt", witness


@pytest.mark.parametrize(
    "command",
    [
        ["prior_dist.evaluate", "zero-shot", "--checkpoint"],
        ["prior_dist.export", "--out", "EXPORT", "--checkpoint"],
        ["prior_dist.visualize", "attention", "--checkpoint"],
    ],
    ids=["evaluate", "export", "visualize"],
)
def test_commands_refuse_a_checkpoint_that_would_run_code(tmp_path, command):
    run, states, witness = hostile_run(tmp_path)
    args = [str(tmp_path / a) if a == "EXPORT" else a for a in command] + [str(run)]
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert str(states) in proc.stderr and "refused" in proc.stderr
    assert not witness.exists()


def test_checkpoint_files_are_checked_before_deepspeed_reads_them(tmp_path):
    witness = tmp_path / "code-ran"
    torch.save({"module": {"w": torch.ones(2)}}, tmp_path / "mp_rank_00_model_states.pt")
    check_torch_files(tmp_path)  # tensors and plain data pass
    hostile_torch_file(tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt", witness)
    with pytest.raises(UnsafeFileError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        check_torch_files(tmp_path)
    assert not witness.exists()


def test_rank_state_round_trips_as_json_and_safetensors(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    state = {"loader": {"epoch": 1, "step": 7}, "rng": checkpoints.rng_state()}
    checkpoints._save_rank_state(tmp_path, 0, state)
    values, tensors = rank_files(tmp_path, 0)
    assert values.is_file() and tensors.is_file()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    loaded = checkpoints._load_rank_state(tmp_path, 0)
    assert loaded["loader"] == {"epoch": 1, "step": 7}
    checkpoints.set_rng_state(loaded["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_legacy_rank_file_loads_without_unpickling_code(tmp_path):
    """Checkpoints from before the JSON format still resume; a hostile one is refused."""
    np.random.seed(4)
    old = {
        "loader": {"epoch": 0, "step": 2},
        "rng": {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
    }
    expected = float(np.random.rand())
    torch.save(old, legacy_rank_file(tmp_path, 0))
    loaded = checkpoints._load_rank_state(tmp_path, 0)
    checkpoints.set_rng_state(loaded["rng"])
    assert loaded["loader"]["step"] == 2 and float(np.random.rand()) == expected
    witness = tmp_path / "code-ran"
    torch.save({"loader": RunsCode(str(witness))}, legacy_rank_file(tmp_path, 1))
    with pytest.raises(UnsafeFileError, match="rank00001.pt"):
        checkpoints._load_rank_state(tmp_path, 1)
    assert not witness.exists()


def test_plain_torch_files_still_load(tmp_path):
    torch.save({"a": torch.arange(3), "b": [1, "x", None]}, tmp_path / "f.pt")
    out = safe_torch_load(tmp_path / "f.pt")
    assert out["b"] == [1, "x", None] and out["a"].tolist() == [0, 1, 2]
