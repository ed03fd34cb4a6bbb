import json
import os
import subprocess
import sys

from conftest import REPO
from test_loader import all_keys


def test_two_gloo_ranks_two_workers(phantom_dir, tokenizer, tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(REPO / "tests" / "dist_loader_check.py"),
            str(phantom_dir),
            str(phantom_dir / "wordpiece"),
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["resume_ok"]
    steps = result["steps"]
    assert len(steps) == result["num_batches"]
    served = [k for step in steps for rank_keys in step for k in rank_keys]
    assert sorted(served) == all_keys(phantom_dir)
    # Step by step the same samples as one rank with micro-batch 2B.
    from prior_dist.data.loader import PriorLoader
    from prior_dist.data.transforms import TransformConfig

    single = [
        b["key"]
        for b in PriorLoader(
            phantom_dir,
            tokenizer,
            6,
            seed=11,
            rank=0,
            world_size=1,
            transform=TransformConfig(image_size=32),
        )
    ]
    assert single == [step[0] + step[1] for step in steps]
