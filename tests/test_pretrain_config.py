"""Bad configurations are refused before any process group starts, naming the field."""

import json
import subprocess
import sys
import time

import pytest
import torch

from prior_dist.pretrain import main
from prior_dist.training.cli import runtime_failure
from prior_dist.training.ds_config import engine_config, read_deepspeed_config
from prior_dist.training.engine import precision_dtype, wants_compile
from prior_dist.training.recipe import CONFIG_DIR, load_recipe
from prior_dist.training.schedule import learning_rate, plan_stages
from tests.conftest import REPO
from tests.pretrain_runs import env


def _write(tmp_path, config: dict | str | None):
    path = tmp_path / "ds.json"
    if isinstance(config, dict):
        path.write_text(json.dumps(config))
    elif isinstance(config, str):
        path.write_text(config)
    return path


def _run(tmp_path, config: dict | str | None, *args):
    path = _write(tmp_path, config)
    cmd = [
        sys.executable,
        str(REPO / "launch/pretrain.py"),
        "--config",
        str(path),
        "--run-dir",
        str(tmp_path / "run"),
        *args,
    ]
    start = time.time()
    # An overall bound on a busy machine; the test waits for the exit, not for a time budget.
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=540)
    return proc, time.time() - start


GOOD = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}


@pytest.mark.parametrize(
    "config, args, message",
    [
        (GOOD, ["--recipe", "paper"], "needs train_micro_batch_size_per_gpu=98 but"),
        ({**GOOD, "optimizer": {"type": "Adam"}}, ["--recipe", "tiny"], "remove the 'optimizer'"),
        ("{not json", ["--recipe", "tiny"], "not valid JSON"),
        (
            {"zero_optimization": {"stage": 2}},
            ["--recipe", "tiny"],
            "train_micro_batch_size_per_gpu must be a positive integer",
        ),
        (
            {**GOOD, "zero_optimization": {"stage": 5}},
            ["--recipe", "tiny"],
            "zero_optimization.stage must be 0, 1, 2 or 3",
        ),
        ({**GOOD, "fp16": {"enabled": True}}, ["--recipe", "tiny"], "fp16 needs a CUDA device"),
        (
            GOOD,
            ["--recipe", "tiny", "--set", "train.sed=1"],
            "train.sed: unknown field; allowed: ['activation_checkpointing',",
        ),
        (
            GOOD,
            ["--recipe", "tiny", "--set", "train.seed=abc"],
            "train.seed: input should be a valid integer, got 'abc'",
        ),
        (
            GOOD,
            ["--recipe", "tiny", "--set", "model.heads.local_attention_impl=cuda"],
            "model.heads.local_attention_impl: input should be 'auto', 'triton' or 'torch'",
        ),
        (GOOD, ["--recipe", "nope"], "no such recipe"),
        # Once split into ('E', 'd', 'e', 'm', 'a') and a raw TypeError.
        (
            GOOD,
            ["--recipe", "tiny", "--set", "eval.classes=Edema"],
            "eval.classes: input should be a valid array, got 'Edema'",
        ),
        (
            GOOD,
            ["--recipe", "tiny", "--set", "optim.betas=0.9"],
            "optim.betas: input should be a valid array, got 0.9",
        ),
        (
            GOOD,
            ["--recipe", "tiny", "--set", "optim.betas=[0.9, 0.9, 0.9]"],
            "optim.betas: needs at most 2 items, got [0.9, 0.9, 0.9]",
        ),
        (
            GOOD,
            ["--recipe", "tiny", "--set", "model.image.layers=[2, two]"],
            "model.image.layers.1: input should be a valid integer, got 'two'",
        ),
        (GOOD, ["--recipe", "tiny", "--set", "train.stages.5.steps=1"], "not an index"),
        (
            GOOD,
            ["--recipe", "tiny", "--set", "optim.impl=apex"],
            "optim.impl: input should be 'auto'",
        ),
        (
            GOOD,
            ["--recipe", "tiny", "--set", "optim.impl=deepspeed_fused"],
            "optim.impl=deepspeed_fused needs a CUDA device",
        ),
    ],
)
def test_refused_with_a_message(tmp_path, capsys, config, args, message):
    """`launch/pretrain.py`'s main, in this process (the refusals come before any process group
    or import of DeepSpeed's engine); the script itself: test_the_script_refuses_bad_json."""
    if ("fp16" in str(config) or "deepspeed_fused" in str(args)) and torch.cuda.is_available():
        pytest.skip("allowed on CUDA")
    path = _write(tmp_path, config)
    code = main(["--config", str(path), "--run-dir", str(tmp_path / "run"), *args])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    assert message in stderr, stderr
    assert not (tmp_path / "run").exists()  # nothing started


@pytest.mark.parametrize(
    "impl, device, expected",
    [
        ("auto", "cpu", {"torch_adam": True, "fused": True}),
        ("auto", "cuda", {"torch_adam": True, "fused": True}),
        ("torch_fused", "cpu", {"torch_adam": True, "fused": True}),
        ("torch", "cuda", {"torch_adam": True}),
        ("deepspeed_fused", "cuda", {}),
    ],
)
def test_optim_impl_chooses_the_adamw(impl, device, expected):
    """What DeepSpeed is handed: torch_adam makes it build torch.optim.AdamW with the other
    params (fused=True: torch's single-kernel AdamW, the default on every device); neither key:
    DeepSpeed's FusedAdam."""
    recipe, _ = load_recipe("tiny", [f"optim.impl={impl}"])
    path = REPO / "configs/zero2.json"
    config = engine_config(read_deepspeed_config(path), recipe, device)
    params = config["optimizer"]["params"]
    assert config["optimizer"]["type"] == "AdamW"
    assert {k: params[k] for k in ("torch_adam", "fused") if k in params} == expected


def test_the_script_refuses_bad_json(tmp_path):
    proc, _ = _run(tmp_path, "{not json", "--recipe", "tiny")
    assert proc.returncode == 2 and "not valid JSON" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_schedule_warmup_then_cosine():
    recipe, _ = load_recipe("paper")
    spans = plan_stages(recipe.train.stages, steps_per_epoch=10)
    assert [(s.start, s.steps, s.warmup) for s in spans] == [
        (0, 200, 10),
        (200, 300, 10),
        (500, 1000, 50),
    ]
    first, third = spans[0], spans[2]
    assert learning_rate(first, 0) == pytest.approx(1e-7)
    assert learning_rate(first, 5) == pytest.approx(1e-7 + (1e-5 - 1e-7) / 2)
    assert learning_rate(first, 10) == pytest.approx(1e-5)
    assert learning_rate(first, 105) == pytest.approx(0.5e-5)
    assert learning_rate(third, 500) == pytest.approx(1e-8)
    assert learning_rate(third, 1499) < 1e-9
    with pytest.raises(ValueError, match="smaller than one global batch"):
        plan_stages(recipe.train.stages, steps_per_epoch=0)


def test_missing_data_source_is_named(tmp_path):
    proc, _ = _run(
        tmp_path, GOOD, "--recipe", "tiny", "--data", f"{tmp_path / 'a'}:2,{tmp_path / 'b'}"
    )
    assert proc.returncode == 2, proc.stderr
    assert f"data.path source {tmp_path / 'b'}: no manifest.json" in proc.stderr


def test_stale_phantom_shards_are_refused(tmp_path):
    import json

    from prior_dist.data.run_data import shard_directory
    from prior_dist.preparation.phantom import GENERATOR_VERSION
    from prior_dist.preparation.provision import provide_phantom_shards
    from prior_dist.training.recipe import load_recipe

    recipe, _ = load_recipe("tiny", [f"data.path={tmp_path}"])
    num, seed = recipe.data.phantom_studies, recipe.data.phantom_seed
    for source, problem in (
        ({"kind": "phantom", "num": num, "seed": seed}, "'generator': 1"),
        (
            {"kind": "phantom", "num": num + 1, "seed": seed, "generator": GENERATOR_VERSION},
            f"'num': {num + 1}",
        ),
    ):
        (tmp_path / "manifest.json").write_text(json.dumps({"source": source}))
        with pytest.raises(ValueError, match=f"phantom shards with .*{problem}.*delete"):
            provide_phantom_shards(recipe.data, log=lambda _: None)
    (tmp_path / "manifest.json").write_text(
        json.dumps({"source": dict(source, num=num, generator=GENERATOR_VERSION)})
    )
    provide_phantom_shards(recipe.data, log=lambda _: None)
    assert shard_directory(recipe.data) == tmp_path


def test_the_end_of_a_run_prints_a_summary_and_the_next_commands(tmp_path):
    from prior_dist.training.cli import run_summary

    run = tmp_path / "my run"
    zero = {"combined": {"accuracy": 0.4}, "images": 50, "chance": 0.2}
    text = run_summary({"step": 9, "skipped": {"corrupt_sample": 2}, "zero_shot": zero}, run)
    assert "done at step 9; skipped: corrupt_sample 2" in text
    assert "zero-shot accuracy 0.400 over 50 images (chance 0.200)" in text
    assert f"python -m prior_dist.export --checkpoint '{run}' --out '{run}'/export" in text
    assert "{" not in text  # no raw dict
    calibrated = {**zero, "calibrated": {"accuracy": 0.5, "fitted_on": "validate"}}
    text = run_summary({"step": 9, "zero_shot": calibrated}, run)
    assert "zero-shot accuracy 0.500 with class offsets from validate (raw 0.400) over 50" in text
    stopped = run_summary({"step": 4, "stopped_by_signal": True}, run)
    assert "stopped at step 4 by a signal" in stopped and "--resume auto" in stopped


def test_print_config_shows_every_field_resolved(capsys):
    import yaml

    code = main(
        ["--recipe", "tiny", "--set", "eval.classes=[Edema, Atelectasis]", "--print-config"]
    )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert code == 0 and printed["eval"]["classes"] == ["Edema", "Atelectasis"]
    assert printed["model"]["heads"]["sentence_loss_mean"] == "per_report"
    assert {"data", "optim", "train", "checkpoint", "logging", "eval", "model"} <= set(printed)


@pytest.mark.parametrize(
    "assignment, read, expected",
    [
        # Nested mappings, optionals, tuples, lists of literals, ints where floats go,
        # YAML 1.2 exponents.
        (
            "train.stages.0.loss_weights={global: 1, proto: 2}",
            lambda r: r.train.stages[0].loss_weights,
            {"global": 1.0, "proto": 2.0},
        ),
        ("logging.profile_steps=[2, 3]", lambda r: r.logging.profile_steps, (2, 3)),
        ("logging.profile_steps=null", lambda r: r.logging.profile_steps, None),
        ("checkpoint.every_steps=null", lambda r: r.checkpoint.every_steps, None),
        ("checkpoint.every_minutes=5", lambda r: r.checkpoint.every_minutes, 5.0),
        ("eval.classes=[Edema, Atelectasis]", lambda r: r.eval.classes, ("Edema", "Atelectasis")),
        ("optim.betas=[0.8, 0.9]", lambda r: r.optim.betas, (0.8, 0.9)),
        ("train.stages.2.lr=2e-5", lambda r: r.train.stages[2].lr, 2e-5),
        ("model.image.layers=[2, 2, 2, 2]", lambda r: r.model.image.layers, (2, 2, 2, 2)),
        ("data.mode=null", lambda r: r.data.mode, None),
        ("logging.report_to=[jsonl]", lambda r: r.logging.report_to, ("jsonl",)),
        ("train.compile=true", lambda r: r.train.compile, True),
        ("train.compile=auto", lambda r: r.train.compile, "auto"),
        ("data.workers=auto", lambda r: r.data.workers, "auto"),
        ("data.workers=3", lambda r: r.data.workers, 3),
        ("data.token_bucket=0", lambda r: r.data.token_bucket, 0),
    ],
)
def test_set_reaches_typed_fields(assignment, read, expected):
    recipe, _ = load_recipe("tiny", [assignment])
    value = read(recipe)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "assignments, message",
    [
        (
            ["train.stages.0.loss_weights={bogus: 1}"],
            "unknown loss name(s) ['bogus']; allowed: [",
        ),
        (
            ["train.stages.0.loss_weights={global: high}"],
            "train.stages.0.loss_weights.global: input should be a valid number, got 'high'",
        ),
        (["logging.profile_steps=[0, 2]"], "logging.profile_steps.0: input should be greater"),
        (["logging.profile_steps=[2]"], "logging.profile_steps: needs at least 2 items, got [2]"),
        (["checkpoint.every_steps=2.5"], "checkpoint.every_steps: input should be a valid integer"),
        (["train.sync_batchnorm=1"], "train.sync_batchnorm: input should be a valid boolean"),
        (["data.tokenizer=12"], "data.tokenizer: input should be a valid string, got 12"),
        (["logging.report_to=[csv]"], "logging.report_to.0: input should be 'jsonl'"),
        (
            ["train.stages.0={epochs: 1, steps: 2}"],
            "exactly one of epochs or steps per stage, got epochs=1.0 steps=2 (in train.stages.0)",
        ),
        (["model.image=3"], "model.image must be a mapping of fields, got 3"),
        (["model.pretrained=x"], "model: unknown section 'pretrained'"),
        (["bogus.field=1"], "bogus: unknown field; allowed: ['checkpoint', 'data',"),
        # A path that does not fit does not hide the values that do not validate.
        (
            ["train.stages.7.lr=1", "train.seed=x"],
            "2 problems:\n  --set 'train.stages.7.lr=1': '7' is not an index into a list of 3\n"
            "  train.seed: input should be a valid integer, got 'x'",
        ),
        # Every problem at once, each by its path.
        (
            ["train.seed=x", "model.heads.embed_dim=-1", "eval.every_steps=0"],
            "3 problems:\n  model.heads.embed_dim: input should be greater than 0, got -1\n"
            "  train.seed: input should be a valid integer, got 'x'\n"
            "  eval.every_steps: input should be greater than 0, got 0",
        ),
    ],
)
def test_set_refuses_wrong_types_naming_the_path(assignments, message):
    with pytest.raises(ValueError) as caught:
        load_recipe("tiny", assignments)
    assert message in str(caught.value)


def test_a_printed_config_is_a_recipe_that_builds_the_same(tmp_path, capsys):
    """`--print-config > mine.yaml` then `--recipe mine.yaml`: the same recipe."""
    assert main(["--recipe", "demo", "--set", "optim.betas=[0.8, 0.9]", "--print-config"]) == 0
    (tmp_path / "mine.yaml").write_text(capsys.readouterr().out)
    again, _ = load_recipe(str(tmp_path / "mine.yaml"))
    original, _ = load_recipe("demo", ["optim.betas=[0.8, 0.9]"])
    assert again == original


@pytest.mark.parametrize(
    "error, peer",
    [
        (
            RuntimeError(
                "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer"
            ),
            True,
        ),
        (torch.distributed.DistBackendError("NCCL communicator was aborted"), True),
        (RuntimeError("Expected running_mean to have type BFloat16 but got Float"), False),
    ],
)
def test_a_runtime_error_blames_a_peer_only_when_a_collective_failed(error, peer):
    """Seen on the GPU: a dtype error in this rank's own backward was reported as a dead peer."""
    text = runtime_failure(error)
    assert ("a peer rank has probably died" in text) is peer, text
    assert str(error) in text


def test_torch_autocast_counts_as_mixed_precision_with_fp32_parameters(tmp_path):
    ds = read_deepspeed_config(REPO / "configs/paper_bf16.json")
    assert ds.autocast and ds.precision == "bf16" and ds.zero_stage == 0
    assert precision_dtype(ds) == torch.float32  # autocast casts per op; inputs stay fp32
    path = tmp_path / "both.json"
    path.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": 2,
                "bf16": {"enabled": True},
                "torch_autocast": {"enabled": True, "dtype": "bfloat16"},
            }
        )
    )
    with pytest.raises(ValueError, match="torch_autocast.enabled with bf16.enabled"):
        read_deepspeed_config(path)
    path.write_text(
        json.dumps(
            {"train_micro_batch_size_per_gpu": 2, "torch_autocast": {"enabled": True, "dtype": "x"}}
        )
    )
    with pytest.raises(ValueError, match="torch_autocast.dtype must be one of"):
        read_deepspeed_config(path)
    config = engine_config(ds, load_recipe("paper")[0], "cuda")
    assert config["timers"] == {"throughput": {"enabled": False}}  # it would synchronize


def test_compile_is_on_by_default_on_cuda_under_zero_0_to_2_only():
    assert wants_compile("auto", "cuda", 2) and not wants_compile("auto", "cpu", 2)
    assert not wants_compile("auto", "cuda", 3) and not wants_compile(False, "cuda", 0)
    assert wants_compile(True, "cpu", 0)  # inductor on a CPU, when asked
    with pytest.raises(ValueError, match="ZeRO-3"):
        wants_compile(True, "cuda", 3)
    with pytest.raises(ValueError, match="train.compile"):
        load_recipe("tiny", ["train.compile=maybe"])


def test_the_default_config_is_the_lean_step_in_the_device_s_precision(monkeypatch):
    cpu = read_deepspeed_config(CONFIG_DIR / "default.json")
    assert (cpu.zero_stage, cpu.precision, cpu.autocast) == (0, "fp32", False)
    assert cpu.raw["torch_autocast"]["enabled"] is False and cpu.raw["gradient_clipping"] == 0
    # A GPU that computes bf16 gets bf16 autocast over fp32 parameters.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = read_deepspeed_config(CONFIG_DIR / "default.json")
    assert (gpu.precision, gpu.autocast, precision_dtype(gpu)) == ("bf16", True, torch.float32)
    assert gpu.raw["torch_autocast"]["enabled"] is True


def test_the_command_line_hint_is_for_the_command_line_only():
    from prior_dist.models.config import ModelConfig, model_config

    with pytest.raises(ValueError, match=r"on the command line: --set 'optim.betas=\[x, y\]'"):
        load_recipe("tiny", ["optim.betas=0.9"])
    card = model_config("tiny").to_dict()
    card["image"]["layers"] = 3
    with pytest.raises(ValueError) as caught:
        ModelConfig.from_dict(card, "x/model_card.json: model_config")
    assert str(caught.value) == (
        "x/model_card.json: model_config.image.layers: input should be a valid array, got 3"
    )


def test_a_moved_field_is_read_under_its_new_name(capsys):
    """`model.init_from` and `data.eval_split` moved (`MOVED_FIELDS`): the old names still read,
    with one line naming the new one; both names with different values are refused."""
    recipe, _ = load_recipe("tiny", ["model.init_from=a/run", "data.eval_split=validate"])
    assert recipe.init_from == "a/run" and recipe.eval.final_split == "validate"
    err = capsys.readouterr().err
    assert "model.init_from is now init_from" in err and "data.eval_split is now" in err
    assert load_recipe("tiny", ["init_from=a/run"])[0].init_from == "a/run"
    with pytest.raises(ValueError, match="data.eval_split .* and eval.final_split .* both set"):
        load_recipe("tiny", ["data.eval_split=validate", "eval.final_split=test"])
