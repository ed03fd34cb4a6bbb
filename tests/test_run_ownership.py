"""A run directory belongs to one run: a second run into a live directory is refused (exit 2,
naming the owner), and Ctrl-C on a run started directly checkpoints and stops like SIGTERM; a
second Ctrl-C aborts at once. Real processes, real signals, the tiny recipe."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest

from prior_dist.runs.lock import LOCK
from prior_dist.training.resume_check import compare_recipes
from tests.conftest import REPO
from tests.pretrain_runs import (
    can_mount_in_a_namespace,
    ds_config,
    env,
    free_port,
    in_a_mount_namespace,
    pretrain_args,
    spawn,
    wait_for_step,
)

# A run that only a signal ends (on a busy machine a fixed length could end before the checks).
ENDLESS = ["train.stages.2.steps=1000000"]


def _env() -> dict:
    return dict(env(), MASTER_PORT=str(free_port()))


def _direct(run, shards, config, *extra, overrides=ENDLESS):
    """`python launch/pretrain.py ...`: one process, no launcher (as under an interactive srun),
    in a process group of its own (a terminal's Ctrl-C reaches the whole group)."""
    args = pretrain_args(config, run, shards, *extra, overrides=[*overrides, "data.workers=2"])
    return spawn([sys.executable, *args], _env())


def _pretrain(run, shards, config, *extra, overrides=ENDLESS) -> subprocess.CompletedProcess:
    """`python launch/pretrain.py ...` to its end (bounded)."""
    args = pretrain_args(config, run, shards, *extra, overrides=list(overrides))
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=540
    )


def test_a_second_run_is_refused_and_ctrl_c_checkpoints(reference, tiny_shards):
    run = reference["tmp"] / "owned"
    config = ds_config(reference["tmp"], 16)
    first = _direct(run, tiny_shards, config)
    wait_for_step(run, 2, first)
    second = _pretrain(run, tiny_shards, config)
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"is in use by another run (pid {first.pid} on" in second.stderr, second.stderr[-3000:]
    # Ctrl-C in the terminal: SIGINT to the whole group, loader workers included.
    os.killpg(first.pid, signal.SIGINT)
    output, _ = first.communicate(timeout=540)  # an overall bound: the wait is for the exit
    assert first.returncode == 0, output[-3000:]
    assert "Ctrl-C: checkpointing at the next step" in output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    stopped = int((run / "PREEMPTED").read_text())
    assert (run / "checkpoints" / f"step{stopped:08d}" / "complete.json").is_file()
    assert not (run / LOCK).exists()  # released at the exit
    # The run resumes into its own directory, the lock free again.
    resumed = _pretrain(run, tiny_shards, config, "--max-steps", str(stopped + 1))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout, resumed.stdout[-3000:]


TWO_INTERRUPTS = """
import os, signal, sys
from pathlib import Path
from prior_dist.training.recipe import load_recipe
from prior_dist.training.ds_config import read_deepspeed_config
from prior_dist.training.trainer import Trainer

recipe, _ = load_recipe("tiny", [])
trainer = Trainer(recipe, read_deepspeed_config(sys.argv[1]), Path(sys.argv[2]))
signal.signal(signal.SIGINT, trainer._on_signal)
os.kill(os.getpid(), signal.SIGINT)
assert trainer.stop_signal == "SIGINT"
print("first: will checkpoint", flush=True)
os.kill(os.getpid(), signal.SIGINT)
print("not reached", flush=True)
"""


def test_a_second_ctrl_c_aborts_at_once(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", TWO_INTERRUPTS, str(ds_config(tmp_path, 16)), str(tmp_path)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "first: will checkpoint" in proc.stdout and "second Ctrl-C: aborting" in proc.stdout
    assert "not reached" not in proc.stdout and "Traceback" not in proc.stderr


def test_what_a_resume_may_change():
    saved = {"model": {"text": {"num_heads": 2}}, "logging": {"every": 10}, "data": {"workers": 0}}
    now = {"model": {"text": {"num_heads": 4}}, "logging": {"every": 1}, "data": {"workers": 2}}
    refused, allowed = compare_recipes(saved, now)
    assert refused == ["model.text.num_heads: 2 -> 4"]
    assert allowed == ["data.workers: 0 -> 2", "logging.every: 10 -> 1"]
    stages = compare_recipes({"train": {"stages": [{"steps": 3}]}}, {"train": {"stages": []}})
    assert stages == (["train.stages.0.steps: 3 -> '(absent)'"], [])


@pytest.mark.parametrize(
    ("stages", "accumulation", "verdict"),
    [
        (["train.stages.0.epochs=1", "train.stages.0.steps=null"], 1, "refused"),
        ([], 1, "warned"),  # tiny's schedule is in steps
        (["train.stages.0.epochs=1", "train.stages.0.steps=null"], 2, "same"),
    ],
)
def test_another_global_batch_is_refused_only_for_a_schedule_in_epochs(
    tmp_path, capsys, stages, accumulation, verdict
):
    """A checkpoint of 16 samples per step resumed on 1 rank x 8 (x accumulation)."""
    from prior_dist.training.ds_config import read_deepspeed_config
    from prior_dist.training.recipe import load_recipe
    from prior_dist.training.trainer import Trainer

    checkpoint = tmp_path / "checkpoints" / "step00000004"
    checkpoint.mkdir(parents=True)
    (checkpoint / "complete.json").write_text(json.dumps({"global_batch": 16}))
    config = ds_config(tmp_path, 8, gradient_accumulation_steps=accumulation)
    trainer = Trainer(load_recipe("tiny", stages)[0], read_deepspeed_config(config), tmp_path)
    trainer.world, trainer.resume_path = 1, checkpoint
    if verdict == "refused":
        with pytest.raises(ValueError) as refusal:
            trainer._check_global_batch()
        assert str(refusal.value).startswith(
            f"checkpoint {checkpoint} trained with a global batch of 16 samples per step; this "
            "run has 8 (1 ranks x micro-batch 8 x accumulation 1). The schedule is in epochs "
            "(train.stages.0)"
        )
        assert "keep 16 samples per step (gradient_accumulation_steps: 2)" in str(refusal.value)
        return
    trainer._check_global_batch()
    assert ("WARNING" in capsys.readouterr().out) == (verdict == "warned")


def test_a_resume_that_changes_the_training_is_refused_before_start_up(reference, tiny_shards):
    run = reference["tmp"] / "changed"
    shutil.copytree(reference["one"], run)
    config = ds_config(reference["tmp"], 16)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())

    changes = ["model.text.num_heads=4", "train.seed=5", "logging.every=2"]
    refused = _pretrain(run, tiny_shards, config, overrides=changes)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "would change what its run trains (2 field(s)" in refused.stderr
    assert "model.text.num_heads: 2 -> 4" in refused.stderr and "train.seed: 7" in refused.stderr
    assert "logging.every" not in refused.stderr.split("trains")[1]  # a safe change, not refused
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    allowed = _pretrain(run, tiny_shards, config, "--max-steps", "9", overrides=changes[2:])
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "resume: changed since the saved run: logging.every: 1 -> 2" in allowed.stdout
    missing = _pretrain(run / "nowhere", tiny_shards, config, "--resume", "x", overrides=())
    assert missing.returncode == 2 and "--resume x: no such checkpoint directory" in missing.stderr
    assert not (run / "nowhere").exists()


def test_weights_that_do_not_fit_their_config_are_named(reference, capsys):
    """A run directory whose config no longer fits its checkpoint (edited by hand, or copied
    from another run): evaluate and export exit 2 naming the checkpoint and the keys with both
    shapes, instead of torch's wall of size-mismatch lines."""
    from prior_dist import evaluate, export

    run = reference["tmp"] / "misfit"
    shutil.copytree(reference["one"], run)
    resolved = json.loads((run / "config.resolved.json").read_text())
    resolved["model"]["heads"]["embed_dim"] = 16
    (run / "config.resolved.json").write_text(json.dumps(resolved))
    assert export.main(["--checkpoint", str(run), "--out", str(run / "export")]) == 2
    err = capsys.readouterr().err
    assert "step00000008: does not fit the model it is loaded into" in err, err
    assert "mis-shaped: [" in err and "in the file, (16," in err and err.count("\n") == 1
    assert evaluate.main(["retrieval", "--checkpoint", str(run)]) == 2
    assert "does not fit the model it is loaded into" in capsys.readouterr().err


def test_training_and_evaluation_read_shards_nobody_may_write(tmp_path, tiny_shards):
    """The shards on a read-only bind mount (a private user and mount namespace), without the
    vocabulary or split index a writable copy would have gained: training builds the vocabulary
    into the run directory and keeps the index in memory; evaluation reads the same shards."""
    if not can_mount_in_a_namespace():
        pytest.skip("needs `unshare -rm` (user and mount namespaces) for a read-only bind mount")
    shards = tmp_path / "shards"
    shutil.copytree(
        tiny_shards, shards, ignore=shutil.ignore_patterns("wordpiece", "*.index.bin", ".*")
    )
    run = tmp_path / "run"
    train = [sys.executable] + pretrain_args(
        ds_config(tmp_path, 16), run, shards, "--max-steps", "2"
    )
    evaluate = [sys.executable, "-m", "prior_dist.evaluate", "retrieval", "--checkpoint", str(run)]
    ro = shlex.quote(str(shards))
    script = (
        f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && "
        f"! touch {ro}/probe 2>/dev/null && {shlex.join(train)} && {shlex.join(evaluate)}"
    )
    proc = in_a_mount_namespace(script, _env(), timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "done at step 2" in output and "retrieval on" in output, output[-3000:]
    assert (run / "tokenizer" / "vocab.txt").is_file()
    assert not (shards / "wordpiece").exists()  # nothing was written beside the shards
