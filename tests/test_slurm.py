"""shardify as a real SLURM array job plus a dependent finalize job (the submit script)."""

import os
import subprocess
import sys
import time

import pytest
from conftest import REPO, slurm_unavailable

from prior_dist.data.shards import load_manifest

pytestmark = pytest.mark.slurm


def _wait(job_ids: list[str], timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(
            ["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i"], capture_output=True, text=True
        ).stdout.strip()
        if not out:
            return
        time.sleep(1)
    subprocess.run(["scancel", *job_ids])
    raise AssertionError(f"SLURM jobs {job_ids} did not finish in {timeout}s")


def test_shardify_array_job_and_finalize(tmp_path):
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)
    # A path with a space and shell syntax: it must arrive as given and never run.
    out = tmp_path / "my shards; $(touch PWNED) `touch PWNED2`"
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO))
    args = ["phantom", "--num", "30", "--seed", "2", "--shard-size", "4", "--image-size", "32"]
    proc = subprocess.run(
        ["bash", str(REPO / "launch/slurm/shardify_submit.sh"), "3", str(out), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    array_id, final_id = words[2].rstrip(","), words[5]
    _wait([array_id, final_id])
    logs = "\n".join(p.read_text() for p in tmp_path.glob("prior-shardify-*.out"))
    assert (out / "manifest.json").is_file(), logs
    parts = sorted(p.name for p in out.glob("manifest.part-*"))
    assert parts == [f"manifest.part-{i:05d}-of-00003.json" for i in range(3)], logs
    manifest = load_manifest(out)
    assert manifest["totals"]["samples"] == 30
    assert not list(tmp_path.rglob("PWNED*")), "a shell ran part of the output path"
    # The same shards as a single local run: assignment does not depend on the task count.
    local = tmp_path / "local"
    subprocess.run(
        [sys.executable, "-m", "prior_dist.shardify", *args, "--out", str(local), "--no-progress"],
        check=True,
        env=env,
        capture_output=True,
    )
    shas = lambda m: {s["name"]: s["sha256"] for e in m["splits"].values() for s in e["shards"]}  # noqa: E731
    assert shas(manifest) == shas(load_manifest(local))
    verify = subprocess.run(
        [sys.executable, "-m", "prior_dist.shardify", "verify", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr


def test_pretrain_batch_job_with_two_srun_tasks(tmp_path):
    """launch/slurm/pretrain.sbatch: 2 tasks under srun (rank and world size from SLURM, the
    rendezvous on the first node), tiny recipe, to a final checkpoint."""
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)
    from tests.pretrain_runs import ds_config

    shards, run_dir = tmp_path / "shards", tmp_path / "run"
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        PYTHONPATH=str(REPO),
        PRIOR_REPO=str(REPO),
        RUN_DIR=str(run_dir),
        OMP_NUM_THREADS="1",
    )
    args = [
        "--config",
        str(ds_config(tmp_path, 8)),
        "--recipe",
        "tiny",
        "--set",
        f"data.path={shards}",
        "--max-steps",
        "4",
    ]
    proc = subprocess.run(
        [
            "sbatch",
            "--wait",
            "--ntasks=2",
            "--cpus-per-task=1",
            "--time=10",
            str(REPO / "launch/slurm/pretrain.sbatch"),
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    logs = "\n".join(p.read_text() for p in tmp_path.glob("prior-pretrain-*.out"))
    assert proc.returncode == 0, proc.stderr + logs
    import json

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4], logs
    resolved = json.loads((run_dir / "config.resolved.json").read_text())
    assert resolved["world_size"] == 2
    assert (run_dir / "checkpoints" / "step00000004" / "complete.json").is_file()
