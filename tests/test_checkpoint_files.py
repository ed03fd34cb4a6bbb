"""complete.json records every checkpoint file's size and SHA-256; a damaged newest checkpoint is
set aside and the previous one used, naming the bad file (no process group: one rank's view)."""

import json
import os

import pytest

from prior_dist.runs.checkpoints import FILES, choose_checkpoint, damaged_files, file_records
from prior_dist.runs.layout import MARKER, complete_checkpoints


def _checkpoint(run, step, files=("mp_rank_00_model_states.pt", "rank00000.json")):
    path = run / "checkpoints" / f"step{step:08d}"
    path.mkdir(parents=True)
    for i, name in enumerate(files):
        (path / name).write_bytes(os.urandom(1000 + 17 * i))
    marker = {"step": step, "world_size": 1, "zero_stage": 2, FILES: file_records(path)}
    (path / MARKER).write_text(json.dumps(marker))
    return path


def _flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_intact_checkpoint_has_no_problems_and_records_every_file(tmp_path):
    path = _checkpoint(tmp_path, 3)
    records = json.loads((path / MARKER).read_text())[FILES]
    assert sorted(records) == ["mp_rank_00_model_states.pt", "rank00000.json"]
    assert records["rank00000.json"]["bytes"] == 1017
    assert damaged_files(path) == []


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:500]), "500 bytes, 1000 recorded"),
        (_flip_one_byte, "SHA-256 differs"),
        (lambda p: p.unlink(), "missing"),
    ],
)
def test_truncated_scrambled_or_missing_file_is_named(tmp_path, damage, words):
    path = _checkpoint(tmp_path, 3)
    damage(path / "mp_rank_00_model_states.pt")
    (problem,) = damaged_files(path)
    assert str(path / "mp_rank_00_model_states.pt") in problem and words in problem


def test_ranks_check_disjoint_shares_that_cover_every_file(tmp_path):
    names = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(5)]
    path = _checkpoint(tmp_path, 3, names)
    for name in names:
        _flip_one_byte(path / name)
    shares = [damaged_files(path, rank, 3) for rank in range(3)]
    assert [len(s) for s in shares] == [2, 2, 1]
    assert sorted(p.split(": ")[0].rsplit("/", 1)[1] for s in shares for p in s) == names
    merged = {}
    for rank in range(3):
        merged.update(file_records(path, rank, 3))
    assert set(merged) == set(names)


def test_auto_resume_falls_back_past_a_damaged_checkpoint_and_sets_it_aside(tmp_path):
    _checkpoint(tmp_path, 3)
    newest = _checkpoint(tmp_path, 6)
    (newest / "rank00000.json").write_bytes(b"{}")
    said = []
    chosen = choose_checkpoint(tmp_path, "auto", said.append)
    assert chosen.name == "step00000003"
    assert "WARNING" in said[0] and str(newest / "rank00000.json") in said[0]
    assert "step00000003" in said[0]
    assert (tmp_path / "checkpoints" / "damaged-step00000006" / "rank00000.json").is_file()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step00000003"]
    # The next start picks the same one without a word.
    said.clear()
    assert choose_checkpoint(tmp_path, "auto", said.append).name == "step00000003" and not said


def test_no_intact_checkpoint_is_an_error_and_nothing_is_moved(tmp_path):
    only = _checkpoint(tmp_path, 3)
    _flip_one_byte(only / "mp_rank_00_model_states.pt")
    with pytest.raises(ValueError, match="every complete checkpoint is damaged") as err:
        choose_checkpoint(tmp_path, "auto", print)
    assert "mp_rank_00_model_states.pt" in str(err.value) and "--resume none" in str(err.value)
    assert only.is_dir()
    with pytest.raises(ValueError, match="damaged checkpoint.*SHA-256"):
        choose_checkpoint(tmp_path, str(only), print)
    assert choose_checkpoint(tmp_path, "none", print) is None


def test_checkpoints_without_records_are_trusted_as_before(tmp_path):
    path = _checkpoint(tmp_path, 3)
    marker = json.loads((path / MARKER).read_text())
    del marker[FILES]
    (path / MARKER).write_text(json.dumps(marker))
    (path / "rank00000.json").write_bytes(b"{}")
    assert damaged_files(path) == []
    (path / MARKER).write_text("{not json")
    assert "unreadable" in damaged_files(path)[0]
