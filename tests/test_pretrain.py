"""End-to-end pretraining with the real DeepSpeed launcher on 1 and 2 CPU ranks (tiny recipe)."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from tests.pretrain_runs import (
    LONG,
    assert_traces_close,
    ds_config,
    env,
    final_state,
    launch,
    max_param_difference,
    metrics,
    start,
)

NONFINITE = "tests/nonfinite_pretrain.py"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from prior_dist.data.provision import ensure_phantom_shards, load_training_tokenizer
    from prior_dist.training.recipe import load_recipe

    path = tmp_path_factory.mktemp("tiny") / "shards"
    recipe, _ = load_recipe("tiny", [f"data.path={path}"])
    ensure_phantom_shards(recipe.data, recipe.train.seed, log=lambda _: None)
    load_training_tokenizer(recipe.data, path)
    return path


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """8 steps (stage changes at 3 and 6): 1 rank x 16 and 2 ranks x 8, ZeRO-2."""
    tmp = tmp_path_factory.mktemp("reference")
    one, two = tmp / "one", tmp / "two"
    launch(1, ds_config(tmp, 16), one, shards, "--max-steps", "8")
    launch(2, ds_config(tmp, 8), two, shards, "--max-steps", "8", "--audit-samples")
    return {"tmp": tmp, "one": one, "two": two}


def test_two_ranks_equal_one_rank_at_twice_the_batch(reference):
    one, two = metrics(reference["one"]), metrics(reference["two"])
    assert len(one) == 8 and [r["stage"] for r in one] == [1, 1, 1, 2, 2, 2, 3, 3]
    assert {"global", "local_image", "local_text", "proto", "rec_image", "spg", "kl", "gpa"} <= set(
        one[-1]
    )
    assert_traces_close(two, one, rtol=1e-5)
    # Parameters after 8 AdamW steps at lr 1e-3 (5e-5 is 5% of one step's size).
    assert (
        max_param_difference(final_state(reference["two"], 8), final_state(reference["one"], 8))
        < 5e-5
    )


def test_prototype_bank_identical_on_every_rank_and_samples_audited(reference, shards):
    ranks = [
        [
            json.loads(line)
            for line in (reference["two"] / "samples" / f"rank{r}.jsonl").read_text().splitlines()
        ]
        for r in range(2)
    ]
    assert [line["step"] for line in ranks[0]] == list(range(1, 9))
    for a, b in zip(*ranks):
        assert a["prototype_bank_sha256"] == b["prototype_bank_sha256"]
        assert len(a["keys"]) == len(b["keys"]) == 8 and not set(a["keys"]) & set(b["keys"])
    # The bank trains from stage 2 on.
    assert ranks[0][3]["prototype_bank_sha256"] != ranks[0][5]["prototype_bank_sha256"]
    resolved = json.loads((reference["two"] / "config.resolved.json").read_text())
    assert resolved["world_size"] == 2 and resolved["recipe"]["name"] == "tiny"


def test_resume_reproduces_the_uninterrupted_run(reference, shards):
    tmp = reference["tmp"]
    run = tmp / "resumed"
    launch(2, ds_config(tmp, 8), run, shards, "--max-steps", "4")
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    proc = launch(2, ds_config(tmp, 8), run, shards, "--max-steps", "8", "--audit-samples")
    assert "resumed from" in proc.stdout and "step00000004" in proc.stdout
    assert_traces_close(metrics(run), metrics(reference["two"]), rtol=1e-6)
    assert max_param_difference(final_state(run, 8), final_state(reference["two"], 8)) < 1e-6
    audit = [
        json.loads(line) for line in (run / "samples" / "rank0.jsonl").read_text().splitlines()
    ]
    assert [a["step"] for a in audit] == [5, 6, 7, 8]
    # keep_last=2: older complete checkpoints are pruned.
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == [
        "step00000006",
        "step00000008",
    ]


@pytest.mark.parametrize("stage", [0, 3])
def test_other_zero_stages_give_the_same_trace(reference, shards, stage):
    run = reference["tmp"] / f"zero{stage}"
    launch(2, ds_config(reference["tmp"], 8, stage), run, shards, "--max-steps", "7")
    assert_traces_close(metrics(run), metrics(reference["two"])[:7], rtol=1e-5)


def test_bf16_smoke(reference, shards):
    run = reference["tmp"] / "bf16"
    launch(
        1,
        ds_config(reference["tmp"], 8, 2, bf16={"enabled": True}),
        run,
        shards,
        "--max-steps",
        "2",
    )
    lines = metrics(run)
    assert len(lines) == 2 and all(abs(line["loss"]) < 1e4 for line in lines)


def _wait_for_step(run_dir, step, proc, timeout=540):
    deadline = time.time() + timeout
    while time.time() < deadline:
        lines = metrics(run_dir)
        if lines and lines[-1]["step"] >= step:
            return lines[-1]["step"]
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}):\n{proc.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def test_kill_one_rank_others_exit_and_resume_matches(reference, shards):
    tmp = reference["tmp"]
    config = ds_config(tmp, 8)
    uninterrupted = tmp / "long"
    launch(2, config, uninterrupted, shards, "--max-steps", "12", overrides=LONG)
    run = tmp / "killed"
    proc = start(2, config, run, shards, overrides=LONG)
    _wait_for_step(run, 7, proc)
    victim = int((run / "pids" / "rank1.pid").read_text())
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    output, _ = proc.communicate(timeout=540)  # an overall bound: the wait is for the exit
    assert time.time() - killed_at < 60, "the surviving rank did not exit in time"
    assert proc.returncode != 0
    assert "--local_rank=1" in output and "-9" in output, output[-3000:]
    launch(2, config, run, shards, "--max-steps", "12", overrides=LONG)
    assert_traces_close(metrics(run), metrics(uninterrupted), rtol=1e-6)


def test_sigusr1_on_one_rank_checkpoints_all_and_exits_cleanly(reference, shards):
    tmp = reference["tmp"]
    run = tmp / "preempted"
    proc = start(2, ds_config(tmp, 8), run, shards, overrides=LONG)
    _wait_for_step(run, 4, proc)
    os.kill(int((run / "pids" / "rank0.pid").read_text()), signal.SIGUSR1)
    output, _ = proc.communicate(timeout=540)  # an overall bound: the wait is for the exit
    assert proc.returncode == 0, output[-3000:]
    stopped = int((run / "PREEMPTED").read_text())
    assert "after a signal" in output
    assert metrics(run)[-1]["step"] == stopped
    assert (run / "checkpoints" / f"step{stopped:08d}" / "complete.json").is_file()
    launch(2, ds_config(tmp, 8), run, shards, "--max-steps", str(stopped + 2), overrides=LONG)
    assert metrics(run)[-1]["step"] == stopped + 2 and not (run / "PREEMPTED").exists()


def test_group_sigterm_with_loader_workers_checkpoints_and_stops(reference, shards):
    """`kill -TERM -- -PGID` (what `timeout`, container runtimes and schedulers send) reaches the
    DataLoader workers too: they leave it to their rank, which checkpoints and stops."""
    tmp = reference["tmp"]
    run = tmp / "group_sigterm"
    proc = start(1, ds_config(tmp, 16), run, shards, overrides=[*LONG, "data.workers=2"])
    _wait_for_step(run, 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # start() gives the launcher its own process group
    output, _ = proc.communicate(timeout=600)
    assert "peer rank has probably died" not in output, output[-3000:]
    assert (run / "PREEMPTED").is_file(), output[-3000:]
    stopped = int((run / "PREEMPTED").read_text())
    assert "after a signal" in output
    assert (run / "checkpoints" / f"step{stopped:08d}" / "complete.json").is_file()


def test_crash_during_save_leaves_previous_checkpoint(reference, shards):
    """A checkpoint directory without complete.json (a save cut short) is never resumed."""
    tmp = reference["tmp"]
    run = tmp / "partial"
    launch(1, ds_config(tmp, 16), run, shards, "--max-steps", "3")
    fake = run / "checkpoints" / "step00000005"
    fake.mkdir()
    (fake / "mp_rank_00_model_states.pt").write_bytes(b"truncated")
    proc = launch(1, ds_config(tmp, 16), run, shards, "--max-steps", "4")
    assert (
        "step00000003" in proc.stdout
        and "step00000005" not in proc.stdout.split("resumed from")[1].splitlines()[0]
    )
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    assert not fake.exists()  # removed by the next successful save


def test_resume_refuses_a_checkpoint_that_would_run_code(reference, shards):
    """`--resume auto` checks DeepSpeed's files with a weights-only load before DeepSpeed (which
    unpickles everything) reads them."""
    from tests.test_untrusted_files import hostile_torch_file

    tmp = reference["tmp"]
    run = tmp / "hostile"
    shutil.copytree(reference["one"], run)
    states = run / "checkpoints" / "step00000008" / "mp_rank_00_model_states.pt"
    witness = tmp / "code-ran"
    hostile_torch_file(states, witness)
    proc = launch(1, ds_config(tmp, 16), run, shards, "--max-steps", "9", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert str(states) in proc.stderr and "refused" in proc.stderr
    assert not witness.exists()


def test_nonfinite_loss_is_skipped_then_aborts(reference, shards):
    tmp = reference["tmp"]
    config = ds_config(tmp, 16)
    run = tmp / "nan_skip"
    proc = launch(
        1, config, run, shards, "--max-steps", "3", "--inject-nonfinite", "2", script=NONFINITE
    )
    assert "non-finite loss" in proc.stdout
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]
    run = tmp / "nan_abort"
    proc = launch(
        1,
        config,
        run,
        shards,
        "--max-steps",
        "3",
        "--inject-nonfinite",
        "2,2,2",
        check=False,
        script=NONFINITE,
        overrides=["train.max_nonfinite_steps=3"],
    )
    assert proc.returncode != 0
    assert "3 micro-batches in a row gave a NaN or inf loss at step 2" in proc.stderr


def test_a_port_in_use_fails_at_once_naming_it(reference, shards):
    """A second run on a taken MASTER_PORT is refused by rank 0 before the rendezvous, instead
    of every rank waiting out the store's timeout and blaming a dead peer."""
    import socket

    tmp = reference["tmp"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = launch(
            1, ds_config(tmp, 16), tmp / "port", shards, "--max-steps", "1", check=False, port=port
        )
    assert proc.returncode != 0
    assert f"port {port} is in use" in proc.stderr, proc.stderr[-2000:]


def test_world_size_change_is_refused_for_zero2(reference, shards):
    tmp = reference["tmp"]
    run = tmp / "reshape"
    launch(2, ds_config(tmp, 8), run, shards, "--max-steps", "3")
    proc = launch(1, ds_config(tmp, 16), run, shards, "--max-steps", "4", check=False)
    assert proc.returncode != 0
    assert "written by 2 ranks with ZeRO stage 2; this run has 1 ranks" in proc.stderr


def test_torchrun_launcher_runs_the_same_script(reference, shards):
    import sys

    from tests.pretrain_runs import pretrain_args

    run = reference["tmp"] / "torchrun"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        *pretrain_args(ds_config(reference["tmp"], 8), run, shards, "--max-steps", "3"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_traces_close(metrics(run), metrics(reference["two"])[:3], rtol=1e-5)


def test_evaluation_during_pretraining_is_logged(reference, shards):
    run = reference["tmp"] / "periodic_eval"
    launch(
        1,
        ds_config(reference["tmp"], 16),
        run,
        shards,
        "--max-steps",
        "4",
        overrides=["eval.every_steps=2"],
    )
    lines = metrics(run)
    assert [("eval_i2t_recall@5" in line) for line in lines] == [False, True, False, True]
    assert 0 <= lines[1]["eval_i2t_recall@5"] <= 1 and 0 <= lines[3]["eval_t2i_recall@5"] <= 1
    assert "eval_zero_shot_accuracy" in lines[3]


def test_sentence_initialised_bank_is_rank_independent(reference, shards):
    """`heads.prototype_init=sentences` under ZeRO-3 on 2 ranks: the bank is set from the
    gathered global batch, stays identical on both ranks, and the run equals 1 rank at 2B."""
    tmp = reference["tmp"]
    option = ("--set", "model.heads.prototype_init=sentences")
    one, two = tmp / "init_one", tmp / "init_two"
    proc = launch(1, ds_config(tmp, 16), one, shards, "--max-steps", "5", *option)
    assert "prototype bank set from" in proc.stdout
    launch(2, ds_config(tmp, 8, 3), two, shards, "--max-steps", "5", "--audit-samples", *option)
    assert_traces_close(metrics(two), metrics(one), rtol=1e-5)
    ranks = [
        [json.loads(line) for line in (two / "samples" / f"rank{r}.jsonl").read_text().splitlines()]
        for r in range(2)
    ]
    assert all(a["prototype_bank_sha256"] == b["prototype_bank_sha256"] for a, b in zip(*ranks))
    # Stage 2 starts at step 4: the bank then differs from the N(0, 1) run's.
    plain = metrics(reference["one"])
    assert metrics(one)[3]["proto"] != pytest.approx(plain[3]["proto"], rel=1e-3)
    assert [r["global"] for r in metrics(one)[:3]] == pytest.approx(
        [r["global"] for r in plain[:3]], rel=1e-6
    )
