import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Triton kernels run on CPU tensors through the interpreter, which must be chosen before the
# kernel module is imported. Left alone where it is set already (the GPU suite sets it to 0).
os.environ.setdefault("TRITON_INTERPRET", "1")
REPO = Path(__file__).resolve().parents[1]


def slurm_unavailable() -> str | None:
    """Why SLURM tests cannot run here (None: an `sbatch` on PATH and a partition up)."""
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH (start one with ../shared/tools/slurm-local.sh up)"
    proc = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True)
    if proc.returncode != 0 or "up" not in proc.stdout:
        return (
            f"sbatch present but no partition is up: {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return None


def run_cli(
    *args: str, env: dict | None = None, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m ...` in a subprocess, as a user would (from the repository, or `cwd`)."""
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or REPO,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """61 phantom studies in shards of 7: counts that divide neither the shards nor the batches."""
    out = tmp_path_factory.mktemp("phantom")
    from prior_dist.preparation.build import build_shards
    from prior_dist.preparation.sources import enumerate_phantom
    from prior_dist.preparation.study import PrepareSettings

    records, skipped, source = enumerate_phantom(61, seed=3)
    build_shards(
        records,
        skipped,
        source,
        PrepareSettings(image_size=64, phantom_seed=3),
        out,
        shard_size=7,
        progress=False,
    )
    return out


@pytest.fixture(scope="session")
def tokenizer(phantom_dir):
    from prior_dist.data.tokenize import build_wordpiece

    return build_wordpiece(phantom_dir, phantom_dir / "wordpiece", vocab_size=800)


@pytest.fixture()
def phantom_copy(phantom_dir, tmp_path) -> Path:
    dest = tmp_path / "shards"
    shutil.copytree(phantom_dir, dest)
    return dest


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """The tiny recipe's phantom shards and vocabulary, shared by the pretraining modules."""
    # Imported here: tests.pretrain_runs imports REPO from this module.
    from tests.pretrain_runs import make_tiny_shards

    return make_tiny_shards(tmp_path_factory)


@pytest.fixture(scope="session")
def reference(tiny_shards, tmp_path_factory):
    """8 tiny steps on 1 rank x 16 and on 2 ranks x 8 (ZeRO-2), for the others to compare to."""
    from tests.pretrain_runs import make_reference

    return make_reference(tiny_shards, tmp_path_factory)
