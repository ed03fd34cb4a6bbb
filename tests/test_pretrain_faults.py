"""Faults a long run meets, end to end with the real DeepSpeed launcher (tiny and demo recipes):
a save cut short, a damaged newest checkpoint, a full disk during a save, and an exact resume of
the demo recipe (dropout, loader workers, periodic evaluation). Signals: tests/test_pretrain.py."""

import shlex
import shutil

import pytest

from tests.pretrain_runs import (
    assert_traces_close,
    can_mount_in_a_namespace,
    deepspeed_cmd,
    ds_config,
    in_a_mount_namespace,
    launch,
    metrics,
    pretrain_args,
)


def test_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_resumed(
    reference, tiny_shards
):
    """Step 8's model states truncated (complete.json says how long it was), and a step-9
    directory a crash left without complete.json: the run removes the latter, sets step 8
    aside naming the file, and resumes from step 6."""
    tmp = reference["tmp"]
    run = tmp / "damaged"
    shutil.copytree(reference["one"], run)
    bad = run / "checkpoints" / "step00000008" / "mp_rank_00_model_states.pt"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    partial = run / "checkpoints" / "step00000009"
    partial.mkdir()
    (partial / bad.name).write_bytes(b"cut short")
    proc = launch(1, ds_config(tmp, 16), run, tiny_shards, "--max-steps", "8")
    assert "removed step00000009: an incomplete checkpoint" in proc.stdout
    assert not partial.exists()
    warning = [line for line in proc.stdout.splitlines() if "[prior_dist] WARNING" in line]
    assert warning and str(bad) in warning[0] and "truncated" in warning[0], proc.stdout[-3000:]
    assert "resumed from" in proc.stdout and "step00000006" in proc.stdout
    assert (run / "checkpoints" / "damaged-step00000008" / bad.name).is_file()
    # Steps 7 and 8 run again from step 6 and come out as before.
    assert_traces_close(metrics(run), metrics(reference["one"]), rtol=1e-6)


def test_a_full_disk_during_a_save_names_the_path_and_the_cause(reference, tiny_shards):
    """The run's checkpoint directory is a 64 KiB tmpfs (mounted in a private user and mount
    namespace): the first save fails with ENOSPC."""
    if not can_mount_in_a_namespace():
        pytest.skip("needs `unshare -rm` (user and mount namespaces) to mount a small tmpfs")
    tmp = reference["tmp"]
    run = tmp / "disk_full"
    checkpoints = run / "checkpoints"
    checkpoints.mkdir(parents=True)
    cmd = deepspeed_cmd(1) + pretrain_args(ds_config(tmp, 16), run, tiny_shards, "--max-steps", "3")
    script = (
        f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(checkpoints))} && "
        f"{{ {shlex.join(cmd)}; rc=$?; "
        f"find {shlex.quote(str(checkpoints))} -name complete.json -printf 'FOUND %p\\n'; "
        "exit $rc; }"
    )
    proc = in_a_mount_namespace(script)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 5, output[-3000:]
    message = [line for line in output.splitlines() if "saving checkpoint" in line]
    assert message and str(checkpoints / "step00000003") in message[0], output[-3000:]
    assert "MiB free" in message[0] and "file system is full" in message[0]
    assert "peer rank has probably died" not in output
    assert "FOUND" not in proc.stdout  # nothing looks complete


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory):
    from prior_dist.preparation.provision import provide_phantom_shards
    from prior_dist.training.recipe import load_recipe

    path = tmp_path_factory.mktemp("demo") / "shards"
    recipe, _ = load_recipe("demo", [f"data.path={path}", *DEMO_SMALL])
    provide_phantom_shards(recipe.data, log=lambda _: None)
    return path


# The demo recipe (its model with dropout on, 2 loader workers) on fewer, smaller phantoms, with
# the periodic evaluation on: it draws from the global generator between steps.
DEMO_SMALL = ["data.phantom_studies=40", "data.phantom_image_size=64", "eval.every_steps=2"]


def test_demo_recipe_resumes_exactly(demo_shards, tmp_path):
    config = ds_config(tmp_path, 8)
    options = {"overrides": DEMO_SMALL, "recipe": "demo"}
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    launch(1, config, whole, demo_shards, "--max-steps", "5", **options)
    launch(1, config, resumed, demo_shards, "--max-steps", "3", **options)
    proc = launch(1, config, resumed, demo_shards, "--max-steps", "5", **options)
    assert "resumed from" in proc.stdout and "step00000003" in proc.stdout
    assert [r["step"] for r in metrics(whole)] == [1, 2, 3, 4, 5]
    assert_traces_close(metrics(resumed), metrics(whole), rtol=1e-6)
