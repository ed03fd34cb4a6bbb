"""Evaluation metrics against brute force, and the evaluate CLI on a real tiny run."""

import itertools
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from prior_dist.evaluation.metrics import macro_f1, precision_at_k, retrieval_metrics, roc_auc
from tests.conftest import REPO, run_cli, slurm_unavailable
from tests.pretrain_runs import ds_config, launch


def test_auc_equals_pairwise_count_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40,), generator=g).double()  # many ties
    labels = torch.rand(40, generator=g) > 0.6
    pos, neg = scores[labels], scores[~labels]
    pairs = [(1.0 if p > n else 0.5 if p == n else 0.0) for p, n in itertools.product(pos, neg)]
    assert roc_auc(scores, labels) == pytest.approx(sum(pairs) / len(pairs))
    assert roc_auc(scores, torch.zeros(40, dtype=torch.bool)) != roc_auc(scores, labels)


def test_retrieval_and_precision_and_f1():
    sim = torch.eye(4) + 0.1 * torch.tensor(
        [[0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 20], [0, 0, 0, 0.0]]
    )
    r = retrieval_metrics(sim)
    assert r["recall@1"] == 0.75 and r["recall@5"] == 1.0 and r["median_rank"] == 1.0
    labels = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]])
    assert precision_at_k(sim, labels, labels, ks=(1,))["precision@1"] == 1.0
    assert macro_f1(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), 2) == pytest.approx(
        (2 / 3 + 2 / 3) / 2
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from prior_dist.preparation.provision import provide_phantom_shards
    from prior_dist.training.recipe import load_recipe

    tmp = tmp_path_factory.mktemp("evaluate")
    shards = tmp / "shards"
    recipe, _ = load_recipe("tiny", [f"data.path={shards}", "data.phantom_studies=200"])
    provide_phantom_shards(recipe.data, log=lambda _: None)
    run = tmp / "run"
    # The data path as a user types it: relative to where training starts (the repository).
    relative = os.path.relpath(shards, REPO)
    launch(
        1,
        ds_config(tmp, 8),
        run,
        shards,
        "--max-steps",
        "4",
        overrides=["data.phantom_studies=200", f"data.path={relative}"],
    )
    return run


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_run_reads_the_same_from_anywhere_and_evaluation_writes_nothing(tiny_run, tmp_path):
    """The run stores its data path absolute and its own tokenizer; evaluation from another
    folder works and creates nothing (no lock file, no vocabulary) beside the shards."""
    resolved = json.loads((tiny_run / "config.resolved.json").read_text())
    shards = Path(resolved["recipe"]["data"]["path"])
    assert shards.is_absolute() and (shards / "manifest.json").is_file()
    assert (tiny_run / "tokenizer").is_dir()
    before = _files(shards)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "zs.json"
    run_cli(
        "prior_dist.evaluate",
        "zero-shot",
        "--checkpoint",
        str(tiny_run),
        "--out",
        str(out),
        cwd=elsewhere,
    )
    assert json.loads(out.read_text())["pretrained"]["images"] > 0
    assert _files(shards) == before and _files(elsewhere) == []


def test_an_older_run_with_a_relative_path_and_no_tokenizer_still_loads(tiny_run, tmp_path):
    """Runs written before 2026-12-04: data.path relative to where training ran and no saved
    tokenizer. The shards are found from the run directory's parents and the vocabulary is
    rebuilt in a temporary directory, the same words, writing nothing beside the shards."""
    from prior_dist.runs.load import load_run

    resolved = json.loads((tiny_run / "config.resolved.json").read_text())
    shards = Path(resolved["recipe"]["data"]["path"])
    old = tmp_path / "project"
    shutil.copytree(tiny_run, old / "runs" / "old", ignore=shutil.ignore_patterns("tokenizer"))
    shutil.copytree(shards, old / "data" / "shards", ignore=shutil.ignore_patterns("wordpiece"))
    resolved["recipe"]["data"]["path"] = "data/shards"
    (old / "runs" / "old" / "config.resolved.json").write_text(json.dumps(resolved))
    before = _files(old / "data")
    loaded = load_run(old / "runs" / "old")
    assert loaded.data_path == str((old / "data" / "shards").resolve())
    assert _files(old / "data") == before
    words = ["effusion", "no", "pneumothorax"]
    fresh = load_run(tiny_run).tokenizer
    assert loaded.tokenizer(words)["input_ids"] == fresh(words)["input_ids"]


def test_evaluate_cli_on_a_tiny_run(tiny_run, tmp_path, capsys):
    """Every task; the first through the command line, the rest through `main` in this process
    (the same code after argument parsing, without a fresh interpreter's imports each time)."""
    from prior_dist.evaluate import main as evaluate

    run = tiny_run
    for task, extra in (
        ("zero-shot", []),
        ("retrieval", []),
        ("linear-probe", ["--fractions", "0.5,1", "--seeds", "0,1"]),
        ("segmentation", ["--fractions", "1", "--seeds", "0", "--steps", "3"]),
        ("detection", ["--fractions", "0.5", "--seeds", "0", "--steps", "3"]),
    ):
        out = tmp_path / f"{task}.json"
        args = [task, "--checkpoint", str(run), "--out", str(out), *extra]
        if task == "zero-shot":
            stdout = run_cli("prior_dist.evaluate", *args).stdout
        else:
            assert evaluate(args) == 0
            stdout = capsys.readouterr().out
        result = json.loads(out.read_text())
        assert "pretrained" in result and "random_init" in result, stdout
        assert task in stdout
    zs = json.loads((tmp_path / "zero-shot.json").read_text())["pretrained"]
    assert 0 <= zs["combined"]["accuracy"] <= 1 and zs["images"] > 0
    confusion = torch.tensor(zs["combined"]["confusion"])
    assert int(confusion.sum()) == zs["images"]
    assert float(confusion.diagonal().sum()) / zs["images"] == pytest.approx(
        zs["combined"]["accuracy"]
    )
    probe = json.loads((tmp_path / "linear-probe.json").read_text())["pretrained"]
    assert probe["1"]["labels_used"] == probe["train_images"]
    seg = json.loads((tmp_path / "segmentation.json").read_text())
    for name in ("pretrained", "random_init"):
        dice = seg[name]["1"]["mean_dice_mean"]
        assert 0 <= dice <= 1 and len(seg[name]["classes"]) == 8
    det = json.loads((tmp_path / "detection.json").read_text())["pretrained"]
    assert det["detector"] == "retinanet" and det["test_boxes"] > 0
    assert 0 <= det["0.5"]["map_50_mean"] <= 1 and det["0.5"]["labels_used"] < det["train_images"]
    assert evaluate(["retrieval", "--checkpoint", str(tmp_path / "none")]) == 2
    assert "neither a run directory" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["curves", "attention", "confusion", "neighbours"])
def test_visualize_writes_pngs(tiny_run, tmp_path, kind, capsys):
    """`curves` through the command line, the others through `main` in this process."""
    from PIL import Image

    from prior_dist.visualize import main as visualize

    where = (
        ["--run", str(tiny_run)]
        if kind == "curves"
        else ["--checkpoint", str(tiny_run), "--index", "2", "--device", "cpu"]
    )
    if kind == "curves":
        stdout = run_cli("prior_dist.visualize", kind, *where, "--out", str(tmp_path)).stdout
    else:
        assert visualize([kind, *where, "--out", str(tmp_path)]) == 0
        stdout = capsys.readouterr().out
    path = stdout.strip().rsplit(" ", 1)[-1]
    with Image.open(path) as png:
        assert png.format == "PNG" and png.width >= 400 and png.height >= 300
        # Not a blank canvas: the picture has more than a handful of colours.
        assert len(png.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20


def test_visualize_refuses_a_device_this_machine_lacks(tiny_run, tmp_path, capsys):
    from prior_dist.visualize import main as visualize

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    args = ["attention", "--checkpoint", str(tiny_run), "--out", str(tmp_path)]
    assert visualize([*args, "--device", f"cuda:{count}"]) == 2
    assert f"this machine has {count} CUDA device(s)" in capsys.readouterr().err


@pytest.mark.slurm
def test_evaluate_array_job(tiny_run, tmp_path):
    """launch/slurm/evaluate.sbatch: one array task per (task, seed), each asking for a GPU
    (overridden on this GPU-less cluster by the command line, as the script says)."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    if reason := slurm_unavailable():
        pytest.skip(reason)
    script = REPO / "launch/slurm/evaluate.sbatch"
    assert "\n#SBATCH --gpus-per-task=1\n" in script.read_text()
    out = tmp_path / "results"
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        PYTHONPATH=str(REPO),
        CHECKPOINT=str(tiny_run),
        OUT_DIR=str(out),
        TASKS="zero-shot linear-probe",
        SEEDS="0 1",
    )
    proc = subprocess.run(
        [
            "sbatch",
            "--wait",
            "--array=0-3",
            "--cpus-per-task=1",
            "--gpus-per-task=0",
            str(script),
            "--no-baseline",
            "--fractions",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    logs = "\n".join(p.read_text() for p in tmp_path.glob("prior-evaluate-*.out"))
    assert proc.returncode == 0, proc.stderr + logs
    assert sorted(p.name for p in out.iterdir()) == [
        "linear-probe-seed0.json",
        "linear-probe-seed1.json",
        "zero-shot-seed0.json",
        "zero-shot-seed1.json",
    ], logs
    probe = json.loads((out / "linear-probe-seed1.json").read_text())["pretrained"]
    assert probe["1"]["per_seed"] and "random_init" not in json.loads(
        (out / "linear-probe-seed1.json").read_text()
    )


def test_evaluate_on_public_layouts(tiny_run, tmp_path):
    """Zero-shot on a 5x200-format JSON and a linear probe on COVIDx label files: image-only
    data, no reports, no tokenizer work."""
    import numpy as np

    from tests.imaging import png_bytes

    g = np.random.default_rng(0)
    classes = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
    for i in range(10):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(g.integers(0, 255, (40, 40), np.uint8)))
    (tmp_path / "5x200.json").write_text(
        json.dumps(
            {c: [f"{i}.png" for i in range(10) if i % 5 == k] for k, c in enumerate(classes)}
        )
    )
    out = tmp_path / "zs.json"
    run_cli(
        "prior_dist.evaluate",
        "zero-shot",
        "--checkpoint",
        str(tiny_run),
        "--data",
        f"chexpert5x200:{tmp_path / '5x200.json'}",
        "--out",
        str(out),
    )
    zs = json.loads(out.read_text())["pretrained"]
    assert zs["images"] == 10 and zs["classes"] == classes
    covidx = tmp_path / "covidx"
    for name, count in (("train", 24), ("test", 8)):
        (covidx / name).mkdir(parents=True)
        lines = []
        for i in range(count):
            label = ("negative", "positive")[i % 2]
            pixels = g.integers(0, 120, (40, 40), np.uint8) + (100 if label == "positive" else 0)
            (covidx / name / f"{i}.png").write_bytes(png_bytes(pixels.astype(np.uint8)))
            lines.append(f"p{name}{i} {i}.png {label} src")
        (covidx / f"{name}.txt").write_text("\n".join(lines) + "\n")
    (covidx / "test" / "3.png").write_bytes(b"not a png")  # skipped and counted
    out = tmp_path / "probe.json"
    proc = run_cli(
        "prior_dist.evaluate",
        "linear-probe",
        "--checkpoint",
        str(tiny_run),
        "--data",
        f"covidx:{covidx}",
        "--fractions",
        "1",
        "--seeds",
        "0",
        "--out",
        str(out),
    )
    probe = json.loads(out.read_text())["pretrained"]
    assert probe["exclusive"] and probe["classes"] == ["negative", "positive"]
    assert probe["test_images"] == 7 and "skipped 1 unreadable" in proc.stdout
    assert 0 <= probe["1"]["accuracy_mean"] <= 1
    bad = run_cli(
        "prior_dist.evaluate",
        "retrieval",
        "--checkpoint",
        str(tiny_run),
        "--data",
        f"covidx:{covidx}",
        check=False,
    )
    assert bad.returncode == 2 and "retrieval needs reports" in bad.stderr


def test_retrieval_uses_the_given_classes_and_needs_no_labels_for_recall(tiny_run):
    """Precision@K over the given classes; shards without those labels (a hospital's own
    reports) still get Recall@K, with Precision@K left out and a note saying why."""
    from prior_dist.evaluation.retrieval import retrieval
    from prior_dist.runs.load import load_run

    loaded = load_run(tiny_run)
    result = retrieval(loaded, loaded.data_path, "test", ["Edema", "Pleural Effusion"])
    precision = result["image_to_text"]["precision@10"]
    assert 0 < precision <= 1, result  # was 0.000 for every model: unlabelled classes never matched
    assert "note" not in result
    unlabelled = retrieval(loaded, loaded.data_path, "test", ["No Such Finding"])
    assert "No Such Finding" in unlabelled["note"] and "--classes" in unlabelled["note"]
    for way in ("image_to_text", "text_to_image"):
        assert not any(k.startswith("precision@") for k in unlabelled[way])
        for key, value in unlabelled[way].items():  # the same embeddings, the same recall
            assert value == result[way][key], key


def test_retrieval_and_zero_shot_make_one_choice_about_the_bank(tiny_run):
    """Report sentences go through the prototype bank exactly when zero-shot's prompts do:
    off by default for both, on with `through_bank` / `--bank on`."""
    from prior_dist.evaluation.retrieval import embeddings, retrieval
    from prior_dist.evaluation.zero_shot import PromptOptions
    from prior_dist.runs.load import load_run

    loaded = load_run(tiny_run)
    default = retrieval(loaded, loaded.data_path, "test")
    assert default["through_bank"] is PromptOptions().through_bank is False
    own = embeddings(loaded, loaded.data_path, "test", ["Edema"])[1]
    banked = embeddings(loaded, loaded.data_path, "test", ["Edema"], through_bank=True)[1]
    assert not torch.allclose(own, banked)


def test_results_are_written_beside_the_run_by_default_with_the_full_table(tiny_run):
    proc = run_cli(
        "prior_dist.evaluate", "retrieval", "--checkpoint", str(tiny_run), "--bank", "on"
    )
    out = tiny_run / "eval" / "retrieval.json"
    assert f"results in {out}" in proc.stdout
    written = json.loads(out.read_text())["pretrained"]
    assert written["pairs"] > 0 and written["through_bank"] is True
    assert "image_to_text.recall@10" in proc.stdout and "text_to_image.median_rank" in proc.stdout


def test_device_choice_is_checked_and_recorded(tiny_run, tmp_path):
    from prior_dist.evaluation.inputs import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="this machine has 0 CUDA device"):
            resolve_device("cuda:1")
    with pytest.raises(ValueError, match="expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    out = tmp_path / "zs.json"
    run_cli(
        "prior_dist.evaluate",
        "zero-shot",
        "--checkpoint",
        str(tiny_run),
        "--device",
        "cpu",
        "--out",
        str(out),
        "--no-baseline",
    )
    assert json.loads(out.read_text())["device"] == "cpu"
    bad = run_cli(
        "prior_dist.evaluate",
        "zero-shot",
        "--checkpoint",
        str(tiny_run),
        "--device",
        "cuda:7",
        check=False,
    )
    if not torch.cuda.is_available():
        assert bad.returncode == 2 and "cuda:7" in bad.stderr


def test_prompt_groups_average_each_prompt_in_embedding_space(tiny_run):
    """A group's embedding is the mean of its prompts' normalised report embeddings and of
    their sentence embeddings, each prompt encoded on its own here."""
    from prior_dist.evaluation.zero_shot import encode_prompt_groups
    from prior_dist.runs.load import load_run

    loaded = load_run(tiny_run)
    model, tokenizer = loaded.model, loaded.tokenizer
    texts = ["effusion is observed", "there is effusion", "no effusion"]
    args = (256, torch.device("cpu"), True)
    reports, sentences, mask = encode_prompt_groups(model, tokenizer, [texts[:2], texts[2:]], *args)
    alone = [encode_prompt_groups(model, tokenizer, [[t]], *args) for t in texts]
    normalised = [torch.nn.functional.normalize(a[0][0], dim=-1) for a in alone]
    torch.testing.assert_close(reports[0], (normalised[0] + normalised[1]) / 2)
    torch.testing.assert_close(reports[1], normalised[2])
    torch.testing.assert_close(sentences[0, 0], (alone[0][1][0, 0] + alone[1][1][0, 0]) / 2)
    assert mask.all() and reports.shape[0] == 2


def test_pos_neg_is_a_softmax_over_each_class_pair():
    from prior_dist.evaluation.zero_shot import class_probabilities

    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    got = class_probabilities(logits, "pos_neg")
    for n, c in itertools.product(range(4), range(3)):
        pair = torch.tensor([logits[n, c], logits[n, c + 3]]).softmax(0)
        assert float(got[n, c]) == pytest.approx(float(pair[0]))
    torch.testing.assert_close(class_probabilities(logits, "classes"), logits.softmax(-1))


def test_zero_shot_reports_global_local_and_combined_side_by_side(tiny_run):
    from prior_dist.evaluation.zero_shot import PromptOptions, zero_shot
    from prior_dist.runs.load import load_run

    loaded = load_run(tiny_run)
    result = zero_shot(loaded, loaded.data_path, "test", local_weight=0.5)
    for part in ("combined", "global_only", "local_only"):
        assert sum(result[part]["predicted_share"].values()) == pytest.approx(1.0)
    # The weight sweep on the same images: 0 is the global score, 0.5 the combined one.
    assert result["sweep"]["0.0"] == pytest.approx(result["global_only"]["accuracy"])
    assert result["sweep"]["0.5"] == pytest.approx(result["combined"]["accuracy"])
    rows = torch.tensor(result["combined"]["confusion"]).sum(1)
    assert result["majority"] == pytest.approx(float(rows.max() / rows.sum()))
    options = PromptOptions.named("ensemble", "pos_neg")
    assert options.texts("Pleural Effusion")[:2] == [
        "pleural effusion is observed",
        "effusion is observed",
    ]
    assert options.groups(["Edema"])[1][0] == "no edema"
    paired = zero_shot(loaded, loaded.data_path, "test", prompts=options, local_weight=1.0)
    assert paired["form"] == "pos_neg" and paired["images"] == result["images"]
    banked = zero_shot(loaded, loaded.data_path, "test", prompts=PromptOptions(through_bank=True))
    assert banked["images"] == result["images"] and banked["prompts"] == result["prompts"]


def test_local_weight_auto_is_chosen_on_the_validation_split(tiny_run):
    from prior_dist.evaluation.inputs import open_split
    from prior_dist.evaluation.zero_shot import (
        CHEXPERT_COMPETITION,
        PromptOptions,
        choose_local_weight,
        encode_prompt_groups,
        score_split,
        zero_shot,
    )
    from prior_dist.runs.load import load_run

    loaded = load_run(tiny_run)
    result = zero_shot(loaded, loaded.data_path, "test", local_weight=None)
    chosen = result["local_weight_chosen_on"]
    assert chosen["split"] == "validate" and result["local_weight"] == float(result["local_weight"])
    validate = open_split(loaded.data_path, "validate")
    columns = [validate.classes.index(c) for c in CHEXPERT_COMPETITION]
    groups = encode_prompt_groups(
        loaded.model,
        loaded.tokenizer,
        PromptOptions().groups(CHEXPERT_COMPETITION),
        256,
        torch.device("cpu"),
        PromptOptions().through_bank,
    )
    scored = score_split(loaded, validate, columns, groups, "classes", 64)
    weight, sweep = choose_local_weight(scored, multi_label=False)
    assert weight == result["local_weight"] and sweep == pytest.approx(chosen["sweep"])
    # Class offsets are fitted on the same split: they move accuracy, never a class's ranking.
    calibrated = result["calibrated"]
    assert calibrated["fitted_on"] == "validate" and calibrated["fit_images"] > 0
    assert set(calibrated["offsets"]) == set(CHEXPERT_COMPETITION)
    assert calibrated["per_class_auc"] == pytest.approx(
        result["combined"]["per_class_auc"], nan_ok=True
    )


def test_class_offsets_solve_their_objective_and_undo_a_class_bias():
    """The fitted offsets make the regularised cross-entropy's gradient vanish (its formula by
    hand: mean(softmax - one-hot) + weight x offsets), and undo a bias that drew images to one
    class: the accuracy comes back to the unbiased score's."""
    from prior_dist.evaluation.zero_shot import OFFSET_PRIOR_SD, fit_class_offsets

    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (400,), generator=g)
    logits = torch.randn(400, 4, generator=g) + 2.0 * torch.nn.functional.one_hot(target, 4)
    biased = (logits + torch.tensor([3.0, 0.0, 0.0, 0.0])).softmax(-1)
    offsets = fit_class_offsets(biased, target)
    assert abs(float(offsets.sum())) < 1e-5
    probs = (biased.double().log() + offsets.double()).softmax(-1)
    weight = 1.0 / (OFFSET_PRIOR_SD**2 * len(target))
    gradient = (probs - torch.nn.functional.one_hot(target, 4)).mean(0) + weight * offsets
    assert gradient.abs().max() < 1e-6
    assert float(offsets[0] - offsets[1:].mean()) < -2.0  # the bias, mostly undone
    accuracy = lambda s: float((s.argmax(1) == target).double().mean())  # noqa: E731
    raw, fixed = accuracy(biased), accuracy(biased.log() + offsets)
    assert raw < accuracy(logits) - 0.15 and fixed >= accuracy(logits) - 0.02


def test_multi_label_zero_shot_scores_every_known_label(tiny_run, capsys):
    from prior_dist.evaluate import main as evaluate
    from prior_dist.evaluation.zero_shot import PromptOptions, zero_shot
    from prior_dist.runs.load import load_run

    loaded = load_run(tiny_run)
    with pytest.raises(ValueError, match="pos_neg"):
        zero_shot(loaded, loaded.data_path, "test", multi_label=True)
    options = PromptOptions(form="pos_neg")
    result = zero_shot(loaded, loaded.data_path, "test", prompts=options, multi_label=True)
    assert set(result["combined"]["per_class_auc"]) == set(result["classes"])
    assert result["images"] >= sum(1 for v in result["positives"].values() if v)
    auc = result["global_only"]["macro_auc"]
    assert auc != auc or 0 <= auc <= 1
    out = tiny_run.parent / "multi.json"
    args = ["zero-shot", "--checkpoint", str(tiny_run), "--multi-label", "--no-baseline"]
    assert evaluate([*args, "--prompt-set", "ensemble", "--out", str(out)]) == 0
    assert "macro AUC" in capsys.readouterr().out
    assert json.loads(out.read_text())["pretrained"]["form"] == "pos_neg"


def test_single_label_images_count_unmentioned_as_absent_and_drop_uncertain():
    from prior_dist.evaluation.zero_shot import _single_label

    nan = float("nan")
    labels = torch.tensor(
        [
            [1.0, 0.0, 0.0],  # kept: class 0
            [nan, 1.0, nan],  # kept: class 1, the others not mentioned (IU, CheXpert blanks)
            [1.0, 1.0, 0.0],  # two findings
            [0.0, 0.0, 0.0],  # none
            [nan, nan, 1.0],  # kept: class 2
            [1.0, -1.0, 0.0],  # an uncertain class: left out
        ]
    )
    scored = {"labels": labels, "global": torch.arange(6.0)[:, None].repeat(1, 3)}
    kept, target = _single_label(scored)
    assert target.tolist() == [0, 1, 2] and kept["global"][:, 0].tolist() == [0.0, 1.0, 4.0]
