"""Seed sweeps: the summary's arithmetic, and a real sweep as a SLURM array of tiny runs."""

import json
import os
import statistics
import subprocess
import sys

import pytest

from prior_dist.evaluation.seeds import format_summary, summarize
from prior_dist.sweep import main as sweep
from tests.conftest import REPO, slurm_unavailable
from tests.pretrain_runs import ds_config


def test_summary_is_mean_and_sample_sd_over_seeds():
    per_seed = {
        "1": {"zero-shot": {"combined": {"accuracy": 0.5}, "majority": 0.3, "images": 10}},
        "2": {"zero-shot": {"combined": {"accuracy": 0.7}, "majority": 0.3, "images": 10}},
        "3": {"zero-shot": {"combined": {"accuracy": 0.6}, "majority": 0.3, "images": 10}},
        "4": {"retrieval": {"image_to_text": {"recall@10": 0.25}}},
    }
    summary = summarize(per_seed)
    accuracy = summary["zero-shot"]["combined.accuracy"]
    assert accuracy["mean"] == pytest.approx(0.6)
    assert accuracy["std"] == pytest.approx(statistics.stdev([0.5, 0.7, 0.6]))
    assert (accuracy["min"], accuracy["max"], accuracy["seeds"]) == (0.5, 0.7, 3)
    assert accuracy["values"] == {"1": 0.5, "2": 0.7, "3": 0.6}
    assert summary["zero-shot"]["majority"]["std"] == 0.0
    assert summary["retrieval"]["image_to_text.recall@10"]["std"] is None  # one seed
    assert "global_only.accuracy" not in summary["zero-shot"]  # no seed has it
    assert any(line.startswith("zero-shot  combined.accuracy") for line in format_summary(summary))


@pytest.mark.slurm
def test_seed_sweep_as_a_slurm_array(tiny_shards, tmp_path):
    """Two seeds of the tiny recipe as two array tasks, each trained and evaluated, then the
    summary over both."""
    if reason := slurm_unavailable():
        pytest.skip(reason)
    out = tmp_path / "sweep"
    # The tiny data's test split has no single-label image: the train split is scored.
    options = ["--seeds", "1,2", "--recipe", "tiny", "--tasks", "zero-shot"]
    options += ["--eval-args", "--split train"]
    options += ["--config", str(ds_config(tmp_path, 8)), "--data", str(tiny_shards)]
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO), PRIOR_PROGRESS="0")
    proc = subprocess.run(
        ["sbatch", "--wait", "--array=0-1", "--cpus-per-task=1", "--gpus-per-task=0"]
        + [str(REPO / "launch/slurm/seed_sweep.sbatch"), str(out), *options],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
    )
    logs = "\n".join(p.read_text() for p in tmp_path.glob("prior-sweep-*.out"))
    assert proc.returncode == 0, proc.stderr + logs
    results = {
        seed: json.loads((out / f"seed{seed}" / "eval" / "zero-shot.json").read_text())
        for seed in (1, 2)
    }
    resolved = json.loads((out / "seed2" / "config.resolved.json").read_text())
    assert resolved["recipe"]["train"]["seed"] == 2
    assert sweep([str(out), *options, "--summary"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    accuracy = summary["numbers"]["zero-shot"]["combined.accuracy"]
    values = [results[s]["pretrained"]["combined"]["accuracy"] for s in (1, 2)]
    assert summary["seeds"] == ["1", "2"] and accuracy["values"] == {"1": values[0], "2": values[1]}
    assert accuracy["std"] == pytest.approx(statistics.stdev(values))
