"""The global loss's gather-with-gradient over 2 real gloo ranks equals the full batch."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_two_rank_all_gather_global_loss_and_sync_batchnorm_equal_full_batch(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(REPO / "tests/dist_gather_check.py"),
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"out.{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["loss_error"] < 1e-12 and r["grad_error"] < 1e-12, r
        assert r["pooled_loss_error"] < 1e-12 and r["pooled_grad_error"] < 1e-12, r
        assert r["pooled_slow_error"] < 1e-12, r
        assert r["bn_kind"] == "AllReduceSyncBatchNorm", r
        assert r["bn_output_error"] < 1e-12 and r["bn_stats_error"] < 1e-12, r
        assert r["bn_grad_error"] < 1e-12 and r["bn_forward_syncs"] == 0, r
    # The two ranks score different rows, so their local losses differ.
    assert results[0]["local_loss"] != results[1]["local_loss"]
