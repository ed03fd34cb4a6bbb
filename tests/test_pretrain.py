"""End-to-end pretraining with the real DeepSpeed launcher on 1 and 2 CPU ranks (tiny recipe)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from prior_dist.runs.checkpoints import file_records
from prior_dist.runs.lock import process_running
from tests.pretrain_runs import (
    LONG,
    assert_traces_close,
    deepspeed_cmd,
    ds_config,
    env,
    final_state,
    free_port,
    launch,
    max_param_difference,
    metrics,
    pretrain_args,
    spawn,
    start,
    universal_states,
    wait_for_step,
)

NONFINITE = "tests/nonfinite_pretrain.py"


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


def test_prototype_bank_identical_on_every_rank_and_samples_audited(reference, tiny_shards):
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


def test_resume_reproduces_the_uninterrupted_run(reference, tiny_shards):
    tmp = reference["tmp"]
    run = tmp / "resumed"
    launch(2, ds_config(tmp, 8), run, tiny_shards, "--max-steps", "4")
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    proc = launch(2, ds_config(tmp, 8), run, tiny_shards, "--max-steps", "8", "--audit-samples")
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


def test_compiled_towers_and_heads_train_like_eager(reference, tiny_shards):
    """`train.compile=true` through the real launcher and ZeRO-2 engine on one CPU rank
    (inductor): every module compiled, and the loss trace across the first stage change that
    of the eager reference run (stage 3's heads: tests/test_fixed_shapes.py)."""
    run = reference["tmp"] / "compiled"
    proc = launch(
        1,
        ds_config(reference["tmp"], 16),
        run,
        tiny_shards,
        "--max-steps",
        "4",
        overrides=["train.compile=true"],
        timeout=1200,
    )
    log = proc.stdout + proc.stderr
    assert "train.compile: image, text, report_pool, local_alignment" in log
    graphs = re.search(r"train.compile: (\d+) graphs compiled, (\d+) graph breaks", log)
    assert graphs and int(graphs[1]) > 0 and graphs[2] == "0", log[-3000:]
    assert_traces_close(metrics(run), metrics(reference["one"])[:4], rtol=1e-4, atol=1e-5)


def test_bf16_smoke_with_profile_and_reports(reference, tiny_shards, monkeypatch):
    """A 1-rank bf16 run (the CPU smoke test of bf16) that also exercises the reporting:
    the profiler window, the data-wait warning, TensorBoard and W&B offline, and the fp32
    master weights evaluation reads."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = reference["tmp"] / "bf16"
    proc = launch(
        1,
        ds_config(reference["tmp"], 8, 2, bf16={"enabled": True}),
        run,
        tiny_shards,
        "--max-steps",
        "2",
        "--set",
        "logging.profile_steps=[2, 3]",  # a window the run ends inside: still written
        "--set",
        "logging.data_wait_warn=0.0",  # any wait at all: the warning's plumbing
        "--set",
        "logging.data_wait_window=2",
        "--set",
        "logging.report_to=[tensorboard, wandb]",
    )
    lines = metrics(run)
    assert len(lines) == 2 and all(abs(line["loss"]) < 1e4 for line in lines)
    assert "data wait" in proc.stdout + proc.stderr and "steps 1..2" in proc.stdout + proc.stderr
    ops = (run / "profile" / "ops.txt").read_text()
    assert "steps 2..2, sorted by self_cpu_time_total" in ops and "aten::" in ops
    assert json.loads((run / "profile" / "trace.json").read_text())["traceEvents"]
    # logging.report_to: the same numbers as metrics.jsonl, the resolved config as the config.
    losses = [line["loss"] for line in lines]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(losses, rel=1e-6)
    assert "config/text_summary" in events.Tags()["tensors"]
    (offline,) = (run / "wandb").glob("offline-run-*")
    assert offline.name.endswith((run / "wandb_run_id").read_text().strip())
    # The offline log is protobuf records (no Python reader ships with wandb 0.31): the logged
    # values and the config's keys appear in it as JSON text.
    (log,) = offline.glob("run-*.wandb")
    data = log.read_bytes()
    assert all(json.dumps(loss).encode() in data for loss in losses)
    assert b"steps_per_epoch" in data and b"local_logit_scale" in data
    # Evaluation and export read the optimizer's fp32 master weights, not the module's bf16
    # copies (which the checkpoint's module file holds under bf16).
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from prior_dist.runs.load import load_run
    from prior_dist.runs.safe_load import safe_torch_load

    checkpoint = sorted((run / "checkpoints").glob("step*"))[-1]
    masters = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), checkpoint.name)
    module = safe_torch_load(checkpoint / "mp_rank_00_model_states.pt")["module"]
    loaded = load_run(run).model.state_dict()
    assert module["model.prototype_bank.prototypes"].dtype == torch.bfloat16
    differ = 0
    for name, value in loaded.items():
        assert torch.equal(value, masters[f"model.{name}"]), name
        differ += not torch.equal(value, module[f"model.{name}"].to(value.dtype))
    assert differ > 0  # trained weights the bf16 copies round (masters start as those copies)


def test_info_describes_the_training_a_run_did(reference, tiny_shards, capsys):
    """`info --recipe R --config C --ranks N` agrees with what the 2-rank run resolved."""
    from prior_dist.info import main as info

    resolved = json.loads((reference["two"] / "config.resolved.json").read_text())
    args = ["--recipe", "tiny", "--set", f"data.path={tiny_shards}", "--no-flops"]
    assert info([*args, "--config", resolved["deepspeed_config_path"], "--ranks", "2"]) == 0
    out = capsys.readouterr().out
    ends = [s["start"] + s["steps"] for s in resolved["stages"]]
    assert f"-> {resolved['steps_per_epoch']} steps per epoch" in out, out
    assert f"stages end at steps {ends}" in out and "x 2 rank(s) = global batch 16" in out, out


@pytest.fixture(scope="module")
def long_run(reference, tiny_shards):
    """The uninterrupted 2-rank run with a long stage 3: interrupted runs must reproduce it."""
    run = reference["tmp"] / "long"
    config = ds_config(reference["tmp"], 8)
    launch(2, config, run, tiny_shards, "--max-steps", str(LONG_STEPS), overrides=LONG)
    return run


LONG_STEPS = 20


def test_kill_one_rank_others_exit_and_resume_matches(long_run, reference, tiny_shards):
    tmp = reference["tmp"]
    config = ds_config(tmp, 8)
    run = tmp / "killed"
    proc = start(2, config, run, tiny_shards, overrides=LONG)
    wait_for_step(run, 7, proc)
    victim = int((run / "pids" / "rank1.pid").read_text())
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    output, _ = proc.communicate(timeout=540)  # an overall bound: the wait is for the exit
    assert time.time() - killed_at < 60, "the surviving rank did not exit in time"
    assert proc.returncode != 0
    assert "--local_rank=1" in output and "-9" in output, output[-3000:]
    launch(2, config, run, tiny_shards, "--max-steps", "12", overrides=LONG)
    assert_traces_close(metrics(run), metrics(long_run)[:12], rtol=1e-6)


def _stopped_by(run, shards, after: int, send, overrides=LONG) -> tuple[int, str]:
    """Start (or resume) the 2-rank run, `send(proc)` once step `after` is logged, wait for
    the exit; every rank checkpointed at one step and stopped. Returns (that step, output)."""
    proc = start(2, ds_config(run.parent, 8), run, shards, overrides=overrides)
    wait_for_step(run, after, proc)
    send(proc)
    output, _ = proc.communicate(timeout=540)  # an overall bound: the wait is for the exit
    assert (run / "PREEMPTED").is_file(), output[-3000:]
    stopped = int((run / "PREEMPTED").read_text())
    assert stopped >= after and metrics(run)[-1]["step"] == stopped, output[-3000:]
    assert (run / "checkpoints" / f"step{stopped:08d}" / "complete.json").is_file()
    assert "peer rank has probably died" not in output, output[-3000:]
    for rank in range(2):
        pid = int((run / "pids" / f"rank{rank}.pid").read_text())
        assert not _alive(pid), f"rank {rank} (pid {pid}) still runs after the launcher exited"
    return stopped, output


def _alive(pid: int) -> bool:
    """Whether `pid` still runs. A zombie does not: a rank whose agent or launcher exited
    without reaping it waits for PID 1, which on some machines reaps after minutes."""
    return process_running(pid)


def test_three_signals_stop_the_run_and_it_resumes_to_the_uninterrupted_trace(
    long_run, reference, tiny_shards
):
    """SIGUSR1 to one rank; SIGTERM to the `deepspeed` launcher alone (it dies without telling
    the ranks; each notices); `kill -TERM -- -PGID` of the whole group, DataLoader workers
    included (they leave the signal to their rank). Each time every rank checkpoints at the
    same step and stops, and the run resumed three times equals the uninterrupted one."""
    run = reference["tmp"] / "signals"

    def usr1_to_rank0(proc):
        os.kill(int((run / "pids" / "rank0.pid").read_text()), signal.SIGUSR1)

    first, output = _stopped_by(run, tiny_shards, 3, usr1_to_rank0)
    assert "after a signal" in output
    launcher = {}

    def term_to_the_launcher(proc):
        launcher["pid"] = proc.pid
        os.kill(proc.pid, signal.SIGTERM)  # start() gave it its own group: nobody else gets it

    second, output = _stopped_by(run, tiny_shards, first + 2, term_to_the_launcher)
    assert f"the deepspeed launcher (pid {launcher['pid']}) exited" in output, output[-3000:]

    def term_to_the_group(proc):
        os.killpg(proc.pid, signal.SIGTERM)

    third, _ = _stopped_by(
        run, tiny_shards, second + 2, term_to_the_group, overrides=[*LONG, "data.workers=2"]
    )
    assert first < second < third <= LONG_STEPS, (first, second, third)
    assert_traces_close(metrics(run), metrics(long_run)[:third], rtol=1e-6)


def test_a_stop_checkpoint_outlives_the_launchers_kill(long_run, reference, tiny_shards, tmp_path):
    """SIGTERM to DeepSpeed's per-node launcher, which SIGKILLs a rank 30 s after terminating
    it, while rank 0's stop checkpoint is held unwritten (tests/slow_save_pretrain.py): the
    writer outlives rank 0 and the launcher; a run started then waits for it, and once it
    completes the checkpoint resumes from it to the uninterrupted trace."""
    import psutil

    from prior_dist.runs.detached import live_writers, wait_until

    run, gate = reference["tmp"] / "outlives", tmp_path / "gate"
    config = ds_config(run.parent, 8)
    script = "tests/slow_save_pretrain.py"
    args = pretrain_args(config, run, tiny_shards, overrides=LONG, script=script)
    proc = spawn([*deepspeed_cmd(2), *args, "--gate-save", str(gate)])
    wait_for_step(run, 2, proc)
    rank0 = int((run / "pids" / "rank0.pid").read_text())
    os.kill(psutil.Process(rank0).ppid(), signal.SIGTERM)  # launch.py: its ranks, then SIGKILL
    output, _ = proc.communicate(timeout=540)
    wait_until(lambda: not _alive(rank0), timeout_s=120)  # the launcher's SIGKILL
    stopped = metrics(run)[-1]["step"]
    checkpoint = run / "checkpoints" / f"step{stopped:08d}"
    assert not (checkpoint / "complete.json").exists() and live_writers(checkpoint), output[-3000:]
    resume = spawn(
        deepspeed_cmd(2)
        + pretrain_args(config, run, tiny_shards, "--max-steps", str(stopped + 2), overrides=LONG)
    )
    seen = []
    for line in resume.stdout:  # ends at the line, or when the run ends without it
        seen.append(line)
        if f"waiting for the writers still saving {checkpoint}" in line:
            gate.touch()
            break
    rest, _ = resume.communicate(timeout=540)
    output = "".join(seen) + rest
    assert resume.returncode == 0 and gate.exists(), output[-3000:]
    assert f"resumed from {checkpoint}" in output, output[-3000:]
    assert_traces_close(metrics(run), metrics(long_run)[: stopped + 2], rtol=1e-6)


def test_resume_refuses_a_checkpoint_that_would_run_code(reference, tiny_shards):
    """`--resume auto` checks DeepSpeed's files with a weights-only load before DeepSpeed (which
    unpickles everything) reads them."""
    from tests.test_untrusted_files import hostile_torch_file

    tmp = reference["tmp"]
    run = tmp / "hostile"
    shutil.copytree(reference["one"], run)
    states = run / "checkpoints" / "step00000008" / "mp_rank_00_model_states.pt"
    witness = tmp / "code-ran"
    hostile_torch_file(states, witness)
    # An attacker who knows the format records the new file's size and hash too, so the
    # integrity check passes and the weights-only load is what refuses it.
    marker = json.loads((states.parent / "complete.json").read_text())
    marker["files"] = file_records(states.parent)
    (states.parent / "complete.json").write_text(json.dumps(marker))
    proc = launch(1, ds_config(tmp, 16), run, tiny_shards, "--max-steps", "9", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert str(states) in proc.stderr and "refused" in proc.stderr
    assert not witness.exists()


def test_nonfinite_loss_is_skipped_then_aborts(reference, tiny_shards):
    tmp = reference["tmp"]
    config = ds_config(tmp, 16)
    run = tmp / "nan_skip"
    proc = launch(
        1, config, run, tiny_shards, "--max-steps", "3", "--inject-nonfinite", "2", script=NONFINITE
    )
    assert "non-finite loss" in proc.stdout
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]
    run = tmp / "nan_abort"
    proc = launch(
        1,
        config,
        run,
        tiny_shards,
        "--max-steps",
        "6",
        "--inject-nonfinite",
        "2,3,4",
        check=False,
        script=NONFINITE,
        overrides=["train.max_nonfinite_steps=3"],
    )
    assert proc.returncode != 0
    assert "3 steps in a row gave a NaN or inf loss, the last at step 4" in proc.stderr


def test_a_port_in_use_fails_at_once_naming_it(reference, tiny_shards):
    """A second run on a taken MASTER_PORT is refused by rank 0 before the rendezvous, instead
    of every rank waiting out the store's timeout and blaming a dead peer."""
    import socket

    tmp = reference["tmp"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = launch(
            1,
            ds_config(tmp, 16),
            tmp / "port",
            tiny_shards,
            "--max-steps",
            "1",
            check=False,
            port=port,
        )
    assert proc.returncode != 0
    assert f"port {port} is in use" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_resume_on_other_numbers_of_ranks_equals_the_uninterrupted_run(
    reference, tiny_shards, stage
):
    """Under each ZeRO stage: 2 ranks x 8 to step 5 (mid stage 2), 1 rank x 16 to step 7 (mid
    stage 3; one process, no launcher), 4 ranks x 4 to step 8, each resuming the checkpoint of
    the one before: the trace of the uninterrupted 2-rank run (ZeRO-2) within 1e-5. Both
    resumes are mid-stage, so Adam's moments must come along (resetting them at the first
    moves step 7's loss by 5%); step 8's update shows in no loss, so the final weights,
    moments and batch-norm statistics are compared too. ZeRO 1-3 load the checkpoint's
    universal form, converted once beside it (complete, no DeepSpeed leftovers)."""
    tmp = reference["tmp"]
    run = tmp / f"reshape_zero{stage}"
    launch(2, ds_config(tmp, 8, stage), run, tiny_shards, "--max-steps", "5")
    one = launch(1, ds_config(tmp, 16, stage), run, tiny_shards, "--max-steps", "7", direct=True)
    four = launch(4, ds_config(tmp, 4, stage), run, tiny_shards, "--max-steps", "8")
    for proc, step in ((one, 5), (four, 7)):
        assert f"resumed from {run / 'checkpoints' / f'step0000000{step}'}" in proc.stdout
        converted = f"converted {run / 'checkpoints' / f'step0000000{step}'} to DeepSpeed's"
        assert (converted in proc.stdout) == (stage > 0), proc.stdout[-3000:]
    assert "global batch" not in one.stdout + four.stdout  # 16 samples per step throughout
    assert_traces_close(metrics(run), metrics(reference["two"])[:8], rtol=1e-5)
    # Step 8's update (after the last resume) shows in no loss: its weights and moments do.
    # Buffers (batch-norm statistics, which DeepSpeed's universal loading leaves out) too.
    # Within 1e-4: the uninterrupted run itself, on 1 rank x 16 instead of 2 x 8 (no resume),
    # differs by up to 4.9e-5 in the weights (at 5078574; 1.2e-5 at 5cd8dc1) and 3.1e-5 in
    # the first moments: the order of the sums changes with the number of ranks, and a stage's
    # first Adam steps amplify it in the image decoder's convolutions. Moments lost at the last
    # resume change step 8's update by about its learning rate (5e-4) and the moments by a
    # tenth of their largest or more.
    final, want = run / "checkpoints" / "step00000008", reference["two"] / "checkpoints"
    got_module, want_module = final_state(run, 8), final_state(reference["two"], 8)
    if stage == 0:
        assert max_param_difference(got_module, want_module) < 1e-4
        return
    buffers = {n for n, v in want_module.items() if "running_" in n or "num_batches" in n}
    assert len(buffers) > 20
    for name in buffers:
        torch.testing.assert_close(got_module[name], want_module[name], rtol=1e-4, atol=1e-6)
    universal = run / "checkpoints" / "step00000007" / "universal"
    assert (universal / "zero").is_dir() and not (universal / "tmp").exists()
    assert sorted(p.name for p in universal.parent.iterdir() if p.name.startswith(".")) == []
    assert not (universal.parent / "latest_universal").exists()
    got = universal_states(final, tmp / f"final_zero{stage}")
    expected = universal_states(want / "step00000008", tmp / "two_step8_universal")
    assert got.keys() == expected.keys()
    # Weights and moments, each against the largest of its kind.
    scale = {}
    for states in expected.values():
        for key, value in states.items():
            scale[key] = max(scale.get(key, 0.0), float(value.detach().abs().max()))
    for name, states in expected.items():
        assert got[name].keys() == states.keys(), name
        for key, value in states.items():
            difference = got[name][key].detach().flatten().double() - value.flatten().double()
            error = float(difference.abs().max()) / scale[key]  # ZeRO-3's are flat
            assert error < 1e-4, (name, key, error)


def test_another_global_batch_goes_on_from_the_same_sample_with_a_warning(reference, tiny_shards):
    """ZeRO-2, 2 ranks x 8 resumed from step 6 on 1 rank x 8 (the universal form, and half the
    global batch): a warning names both batches, the schedule in steps is kept, and the data go
    on from the same sample: step 7 takes the 8 samples of epoch 0 that batches of 16 left out
    (104 = 6 x 16 + 8, the last partial batch dropped), step 8 the first 8 of epoch 1, those
    rank 0 of the 2-rank run took at its step 7."""
    tmp = reference["tmp"]
    run = tmp / "halved"
    shutil.copytree(reference["two"], run)
    shutil.rmtree(run / "checkpoints" / "step00000008")
    proc = launch(1, ds_config(tmp, 8), run, tiny_shards, "--max-steps", "8", "--audit-samples")
    assert "trained with a global batch of 16 samples per step; this run has 8" in proc.stdout
    assert "served again" not in proc.stdout
    assert [r["stage"] for r in metrics(run)] == [1, 1, 1, 2, 2, 2, 3, 3]

    def audit(directory, rank):
        lines = (directory / "samples" / f"rank{rank}.jsonl").read_text().splitlines()
        return {a["step"]: a["keys"] for a in map(json.loads, lines)}

    ref, after = [audit(reference["two"], r) for r in range(2)], audit(run, 0)
    epoch0 = {key for part in ref for step in range(1, 7) for key in part[step]}
    assert len(epoch0) == 96 and len(epoch0 | set(after[7])) == 104
    assert after[8] == ref[0][7]


def test_torchrun_launcher_runs_the_same_script(reference, tiny_shards):
    run = reference["tmp"] / "torchrun"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        *pretrain_args(ds_config(reference["tmp"], 8), run, tiny_shards, "--max-steps", "3"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_traces_close(metrics(run), metrics(reference["two"])[:3], rtol=1e-5)


def _two_nodes(run, shards, tmp, *extra) -> list[subprocess.Popen]:
    """Two torchrun agents, one rank each, meeting by c10d rendezvous on localhost: two "nodes"
    with their own working directory and TMPDIR, sharing the run directory (as on a cluster's
    shared file system)."""
    port, job = free_port(), f"job{free_port()}"
    agents = []
    for node in ("a", "b"):
        home = tmp / f"node_{node}"
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            f"127.0.0.1:{port}",
            "--rdzv_id",
            job,
            *pretrain_args(ds_config(tmp, 8), run, shards, *extra, overrides=LONG),
        ]
        node_env = dict(env(), TMPDIR=str(home / "tmp"))
        agents.append(
            subprocess.Popen(
                cmd,
                cwd=home,
                env=node_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        )
    return agents


def test_two_nodes_train_stop_and_resume_like_one(long_run, reference, tiny_shards):
    """Two torchrun "nodes" (c10d rendezvous) train the 2-rank run; a SIGTERM to one node's
    agent checkpoints every rank at one step; both nodes resumed give the one-node trace."""
    tmp = reference["tmp"] / "two_nodes"
    run = tmp / "run"
    agents = _two_nodes(run, tiny_shards, tmp)
    wait_for_step(run, 3, agents[0])
    os.kill(agents[1].pid, signal.SIGTERM)  # node b's agent (it forwards to its rank)
    output = agents[1].communicate(timeout=540)[0]  # a bounded wait for the exit
    # Every rank checkpoints at one step and exits. Node a's agent then waits in torchrun's
    # exit barrier (300 s) for node b's agent, which is gone: end it once both ranks have
    # exited, with SIGKILL (inside the barrier's C++ wait a SIGTERM waits for the timeout).
    ranks = [int((run / "pids" / f"rank{r}.pid").read_text()) for r in range(2)]
    deadline = time.time() + 540
    while any(_alive(pid) for pid in ranks) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in ranks), output[-3000:]
    os.kill(agents[0].pid, signal.SIGKILL)
    output += agents[0].communicate(timeout=540)[0]
    stopped = int((run / "PREEMPTED").read_text())
    assert (run / "checkpoints" / f"step{stopped:08d}" / "complete.json").is_file(), output[-3000:]
    assert "peer rank has probably died" not in output, output[-3000:]
    agents = _two_nodes(run, tiny_shards, tmp, "--max-steps", str(stopped + 3))
    outputs = [a.communicate(timeout=540)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), outputs[0][-3000:] + outputs[1][-3000:]
    assert "resumed from" in outputs[0] + outputs[1]
    assert_traces_close(metrics(run), metrics(long_run)[: stopped + 3], rtol=1e-6)


def test_evaluation_during_pretraining_is_logged(reference, tiny_shards):
    """Training on the shards at weight 2 (each sample twice an epoch), periodic evaluation
    still reads the validation split's samples once each, for retrieval as for zero-shot."""
    run = reference["tmp"] / "periodic_eval"
    launch(
        1,
        ds_config(reference["tmp"], 16),
        run,
        f"{tiny_shards}:2",
        "--max-steps",
        "4",
        overrides=["eval.every_steps=2"],
    )
    lines = metrics(run)
    assert [("eval_i2t_recall@5" in line) for line in lines] == [False, True, False, True]
    assert 0 <= lines[1]["eval_i2t_recall@5"] <= 1 and 0 <= lines[3]["eval_t2i_recall@5"] <= 1
    assert "eval_zero_shot_accuracy" in lines[3]
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    assert lines[3]["eval_pairs"] == manifest["splits"]["validate"]["num_samples"]


def test_sentence_initialised_bank_is_rank_independent(reference, tiny_shards):
    """`heads.prototype_init=sentences` under ZeRO-3 on 2 ranks: the bank is set from the
    gathered global batch, stays identical on both ranks, and the run equals 1 rank at 2B."""
    tmp = reference["tmp"]
    option = ("--set", "model.heads.prototype_init=sentences")
    one, two = tmp / "init_one", tmp / "init_two"
    proc = launch(1, ds_config(tmp, 16), one, tiny_shards, "--max-steps", "5", *option)
    assert "prototype bank set from" in proc.stdout
    launch(
        2, ds_config(tmp, 8, 3), two, tiny_shards, "--max-steps", "5", "--audit-samples", *option
    )
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
