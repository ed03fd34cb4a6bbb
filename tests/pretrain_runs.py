"""Launching real pretraining runs for tests: the `deepspeed` launcher, 1 or 2 CPU ranks."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from prior_dist.data.run_data import load_training_tokenizer
from prior_dist.preparation.provision import provide_phantom_shards
from prior_dist.runs.safe_load import safe_torch_load
from prior_dist.task import LOSS_NAMES
from prior_dist.training.recipe import load_recipe
from tests.conftest import REPO

# Long enough stage 3 for runs that are interrupted on purpose.
LONG = ["train.stages.2.steps=60"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_cmd(num_ranks: int, port: int | None = None) -> list[str]:
    exe = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    return [exe, "--num_gpus", str(num_ranks), "--master_port", str(port or free_port())]


def ds_config(tmp: Path, micro: int, stage: int = 2, **extra) -> Path:
    path = tmp / f"ds_micro{micro}_zero{stage}_{len(extra)}.json"
    path.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": micro,
                "gradient_accumulation_steps": 1,
                "zero_optimization": {"stage": stage},
                **extra,
            }
        )
    )
    return path


def pretrain_args(
    config: Path,
    run_dir: Path,
    shards: Path,
    *extra: str,
    overrides: list[str] = (),
    script: str = "launch/pretrain.py",
    recipe: str = "tiny",
) -> list[str]:
    sets = [f"data.path={shards}", "optim.eps=1e-6", *overrides]
    return [
        str(REPO / script),
        "--config",
        str(config),
        "--recipe",
        recipe,
        "--run-dir",
        str(run_dir),
        *[a for s in sets for a in ("--set", s)],
        *extra,
    ]


def env() -> dict:
    return dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )


def launch(
    num_ranks: int,
    config: Path,
    run_dir: Path,
    shards: Path,
    *extra: str,
    overrides: list[str] = (),
    check: bool = True,
    timeout: float = 540,
    script: str = "launch/pretrain.py",
    port: int | None = None,
    recipe: str = "tiny",
    direct: bool = False,
) -> subprocess.CompletedProcess:
    """A run under the `deepspeed` launcher; `direct` (one rank): `python launch/pretrain.py`,
    one process and no launcher, as under an interactive `srun`."""
    args = pretrain_args(
        config, run_dir, shards, *extra, overrides=overrides, script=script, recipe=recipe
    )
    environ = env()
    if direct:
        assert num_ranks == 1, "a direct run is one rank"
        cmd = [sys.executable, *args]
        environ["MASTER_PORT"] = str(port or free_port())
    else:
        cmd = deepspeed_cmd(num_ranks, port) + args
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=environ, cwd=REPO, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"pretrain failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def start(
    num_ranks: int,
    config: Path,
    run_dir: Path,
    shards: Path,
    *extra: str,
    overrides: list[str] = (),
) -> subprocess.Popen:
    cmd = deepspeed_cmd(num_ranks) + pretrain_args(
        config, run_dir, shards, *extra, overrides=overrides
    )
    return spawn(cmd)


def spawn(cmd: list[str], environ: dict | None = None, cwd: Path = REPO) -> subprocess.Popen:
    """`cmd` running in a process group of its own (what a terminal's Ctrl-C or a scheduler's
    group signal reaches), its output merged into `stdout`."""
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environ or env(),
        cwd=cwd,
        start_new_session=True,
    )


def in_a_mount_namespace(
    script: str, environ: dict | None = None, timeout: float = 540
) -> subprocess.CompletedProcess:
    """`sh -c script` as root of a private user and mount namespace (its mounts are its own)."""
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True,
        text=True,
        env=environ or env(),
        cwd=REPO,
        timeout=timeout,
    )
    return proc


def can_mount_in_a_namespace() -> bool:
    """Whether `unshare -rm` (user and mount namespaces) may mount here."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def final_state(run_dir: Path, step: int) -> dict:
    """The module state rank 0 saved at `step` (under ZeRO-3 its parameters are partitioned
    placeholders; its buffers are whole)."""
    checkpoint = run_dir / "checkpoints" / f"step{step:08d}"
    path = checkpoint / "mp_rank_00_model_states.pt"
    if not path.is_file():
        path = checkpoint / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    return safe_torch_load(path, deepspeed_types=True)["module"]


LOSS_KEYS = ("loss", *LOSS_NAMES)


def assert_traces_close(a: list[dict], b: list[dict], rtol: float, atol: float = 1e-6) -> None:
    """Every loss term of every step within rtol (relative) + atol (for terms near zero, like
    the SimSiam cosine loss, whose natural scale is 1)."""
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x["stage"] == y["stage"]
        for key in LOSS_KEYS:
            if key in x or key in y:
                assert abs(x[key] - y[key]) <= rtol * abs(y[key]) + atol, (
                    x["step"],
                    key,
                    x[key],
                    y[key],
                )


def universal_states(checkpoint: Path, out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """A ZeRO 1-3 checkpoint's fp32 parameters and Adam moments by name, whatever its
    number of ranks: DeepSpeed's universal form, converted into `out` (unless already there)."""
    from prior_dist.runs.checkpoints import convert_to_universal

    if not out.is_dir():
        convert_to_universal(checkpoint, out)

    def read(path: Path) -> torch.Tensor:
        saved = torch.load(path, weights_only=True)
        return saved["param"] if isinstance(saved, dict) else saved  # ZeRO 1-2 / ZeRO-3

    return {
        d.name: {name: read(d / f"{name}.pt") for name in ("fp32", "exp_avg", "exp_avg_sq")}
        for d in (out / "zero").iterdir()
        if (d / "exp_avg.pt").is_file()  # parameters (ZeRO 1-2 add buffers' weights alone)
    }


def max_param_difference(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(
        float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point()
    )


def wait_for_step(run_dir, step, proc, timeout=540):
    deadline = time.time() + timeout
    while time.time() < deadline:
        lines = metrics(run_dir)
        if lines and lines[-1]["step"] >= step:
            return lines[-1]["step"]
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}):\n{proc.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s")


# What the session fixtures `tiny_shards` and `reference` (tests/conftest.py) build.
def make_tiny_shards(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "shards"
    recipe, _ = load_recipe("tiny", [f"data.path={path}"])
    provide_phantom_shards(recipe.data, log=lambda _: None)
    load_training_tokenizer(recipe.data, path)
    return path


def make_reference(tiny_shards: Path, tmp_path_factory) -> dict:
    """8 steps (stage changes at 3 and 6): 1 rank x 16 and 2 ranks x 8, ZeRO-2. The 2-rank
    run reads its losses from the device every 3 steps (one stacked all-reduce), the 1-rank
    run every step: their per-step records must still agree."""
    tmp = tmp_path_factory.mktemp("reference")
    one, two = tmp / "one", tmp / "two"
    launch(1, ds_config(tmp, 16), one, tiny_shards, "--max-steps", "8")
    launch(
        2,
        ds_config(tmp, 8),
        two,
        tiny_shards,
        "--max-steps",
        "8",
        "--audit-samples",
        overrides=["logging.every=3"],
    )
    return {"tmp": tmp, "one": one, "two": two}
