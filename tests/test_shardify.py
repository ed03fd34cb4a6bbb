import gzip
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from conftest import REPO, run_cli
from imaging import dicom_bytes, gradient, jpeg_bytes, png_bytes

from prior_dist.data.shards import load_manifest

GOOD_REPORT = """ FINAL REPORT
 INDICATION: ___ with cough.
 FINDINGS: The lungs are clear. There is no pleural effusion.
 The heart size is normal. No pneumothorax is seen.
 IMPRESSION: No acute cardiopulmonary process.
"""


def _study(root: Path, subject: str, study: str) -> Path:
    d = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def make_mimic(tmp_path: Path) -> dict:
    images, reports = tmp_path / "jpg", tmp_path / "reports"
    rows = []  # dicom_id, subject_id, study_id, ViewPosition
    arr = (gradient(600, 500)).astype(np.uint8)

    def add(subject, study, dicoms, report):
        d = _study(images, subject, study)
        for dicom, view, data in dicoms:
            if data is not None:
                (d / f"{dicom}.jpg").write_bytes(data)
            rows.append((dicom, subject, study, view))
        rdir = reports / "files" / f"p{subject[:2]}" / f"p{subject}"
        rdir.mkdir(parents=True, exist_ok=True)
        if report is not None:
            (rdir / f"s{study}.txt").write_bytes(
                report if isinstance(report, bytes) else report.encode()
            )

    good = jpeg_bytes(arr)
    add(
        "10000001",
        "50000001",
        [("d1a", "PA", good), ("d1b", "AP", good), ("d1c", "LATERAL", good)],
        GOOD_REPORT,
    )
    add("10000002", "50000002", [("d2a", "PA", b"")], GOOD_REPORT)  # zero-byte
    add("10000003", "50000003", [("d3a", "PA", good[: len(good) // 3])], GOOD_REPORT)  # truncated
    add("10000004", "50000004", [("d4a", "PA", good)], None)  # missing report
    add("10000005", "50000005", [("d5a", "AP", good)], "   \n ")  # empty report
    add("10000006", "50000006", [("d6a", "PA", good)], "INDICATION: cough.\nCOMPARISON: none.")
    add(
        "10000007",
        "50000007",
        [("d7a", "PA", good)],
        GOOD_REPORT.encode("cp1252").replace(b"lungs", b"lung\xe9s"),
    )
    add("10000008", "50000008", [("d8a", "LL", good)], GOOD_REPORT)  # non-frontal only
    add("10000009", "50000009", [("d9a", "PA", None)], GOOD_REPORT)  # no image file
    add("10000010", "50000010", [("d10a", "PA", good)], "FINDINGS: Clear. IMPRESSION: Normal.")
    add("10000011", "50000011", [("d11a", "AP", good)], GOOD_REPORT)
    # An image on disk with no metadata row is never served.
    (_study(images, "10000011", "50000011") / "orphan.jpg").write_bytes(good)
    meta = tmp_path / "mimic-cxr-2.0.0-metadata.csv.gz"
    with gzip.open(meta, "wt") as f:
        f.write(
            "dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,Extra\n"
        )
        for dicom, subject, study, view in rows:
            f.write(f"{dicom},{subject},{study},CHEST,{view},600,x\n")
    split = tmp_path / "split.csv"
    split.write_text(
        "dicom_id,study_id,subject_id,split\n"
        + "".join(
            f"{d},{st},{su},{'test' if st == '50000011' else 'train'}\n" for d, su, st, _ in rows
        )
    )
    labels = tmp_path / "chexpert.csv"
    labels.write_text(
        "subject_id,study_id,Edema,Pneumothorax\n10000001,50000001,1.0,\n10000011,50000011,-1.0,0.0\n"
    )
    return {
        "images": images,
        "reports": reports,
        "metadata": meta,
        "split": split,
        "labels": labels,
    }


def test_mimic_cxr_end_to_end_with_bad_inputs(tmp_path):
    src = make_mimic(tmp_path)
    out = tmp_path / "out"
    proc = run_cli(
        "prior_dist.shardify",
        "mimic-cxr",
        "--images",
        str(src["images"]),
        "--reports",
        str(src["reports"]),
        "--metadata",
        str(src["metadata"]),
        "--split",
        str(src["split"]),
        "--labels",
        str(src["labels"]),
        "--out",
        str(out),
        "--shard-size",
        "2",
        "--image-size",
        "64",
        "--no-progress",
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    manifest = load_manifest(out)
    skipped = {k: v["count"] for k, v in manifest["skipped"].items()}
    assert skipped == {
        "empty_report": 1,
        "missing_image": 1,
        "missing_report": 1,
        "no_sections": 1,
        "non_frontal_only": 1,
        "non_utf8_report": 1,
        "too_few_sentences": 1,
        "unreadable_image": 2,
    }
    assert manifest["skipped"]["missing_report"]["examples"] == ["s50000004"]
    assert summary["manifest"]["samples"] == 2 == manifest["totals"]["samples"]
    assert manifest["totals"]["studies_seen"] == 11
    assert {s: e["num_samples"] for s, e in manifest["splits"].items()} == {"train": 1, "test": 1}
    with tarfile.open(out / "train-000000.tar") as tar:
        names = sorted(tar.getnames())
        meta = json.loads(tar.extractfile("s50000001.json").read())
    assert names == ["s50000001.0.jpg", "s50000001.1.jpg", "s50000001.json"]  # lateral dropped
    assert meta["views"] == ["PA", "AP"] and meta["subject_id"] == "10000001"
    assert meta["labels"] == {"Edema": 1.0, "Pneumothorax": None}
    assert meta["sentences"][0] == "The lungs are clear." and len(meta["sentences"]) == 5
    assert set(meta["sections"]) == {"findings", "impression"}
    with tarfile.open(out / "test-000000.tar") as tar:
        assert sorted(tar.getnames()) == ["s50000011.jpg", "s50000011.json"]  # orphan not served
    verified = run_cli("prior_dist.shardify", "verify", str(out), env={"PRIOR_PROGRESS": "1"})
    assert verified.returncode == 0 and f"verify {out}: 100%" in verified.stderr, verified.stderr


def test_mimic_repair_encoding_and_hash_split(tmp_path):
    src = make_mimic(tmp_path)
    out = tmp_path / "out"
    run_cli(
        "prior_dist.shardify",
        "mimic-cxr",
        "--images",
        str(src["images"]),
        "--reports",
        str(src["reports"]),
        "--metadata",
        str(src["metadata"]),
        "--out",
        str(out),
        "--image-size",
        "32",
        "--encoding-errors",
        "repair",
        "--min-sentences",
        "1",
        "--no-progress",
    )
    manifest = load_manifest(out)
    assert "non_utf8_report" not in manifest["skipped"]
    assert manifest["notes"]["non_utf8_repaired"]["examples"] == ["s50000007"]
    assert manifest["totals"]["samples"] == 4


def test_missing_root_and_bad_metadata_fail_fast(tmp_path):
    src = make_mimic(tmp_path)
    proc = run_cli(
        "prior_dist.shardify",
        "mimic-cxr",
        "--images",
        str(tmp_path / "nope"),
        "--reports",
        str(src["reports"]),
        "--metadata",
        str(src["metadata"]),
        "--out",
        str(tmp_path / "o"),
        check=False,
    )
    assert proc.returncode == 2 and "--images" in proc.stderr and "nope" in proc.stderr
    bad = tmp_path / "meta.csv.gz"
    bad.write_bytes(b"this is not gzip")
    proc = run_cli(
        "prior_dist.shardify",
        "mimic-cxr",
        "--images",
        str(src["images"]),
        "--reports",
        str(src["reports"]),
        "--metadata",
        str(bad),
        "--out",
        str(tmp_path / "o"),
        check=False,
    )
    assert proc.returncode == 2 and "meta.csv.gz" in proc.stderr


def test_manifest_jsonl_csv_dicom_png16_duplicates(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.dcm").write_bytes(
        dicom_bytes(gradient(80, 64, 4095).astype(np.uint16), photometric="MONOCHROME1")
    )
    (tmp_path / "img" / "b.png").write_bytes(png_bytes(gradient(70, 90, 60000).astype(np.uint16)))
    (tmp_path / "img" / "c.jpg").write_bytes(jpeg_bytes(gradient(50, 50)))
    (tmp_path / "img" / "dot.png").write_bytes(png_bytes(gradient(1, 1)))
    (tmp_path / "r.txt").write_text("FINDINGS: Heart normal. Lungs clear.")
    rows = [
        {
            "id": "A.1",
            "image": "img/a.dcm",
            "report": "FINDINGS: Small left effusion.",
            "split": "train",
            "labels": {"Pleural Effusion": 1},
        },
        {
            "id": "B",
            "image": ["img/b.png", "img/c.jpg"],
            "report_path": "r.txt",
            "split": "train",
            "site": "x",
        },
        {"id": "B", "image": "img/c.jpg", "report": "FINDINGS: duplicate."},
        {"id": "C", "image": "img/c.jpg"},
        {"id": "D", "image": "img/c.jpg", "report": ""},
        {"id": "E", "image": "img/dot.png", "report": "FINDINGS: A 1x1 placeholder image."},
        {"id": "F", "image": "img/c.jpg", "report": "FINDINGS: " + "Clear lungs. " * 2000},
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    run_cli(
        "prior_dist.shardify",
        "manifest",
        "--input",
        str(tmp_path / "in.jsonl"),
        "--out",
        str(out),
        "--image-size",
        "32",
        "--format",
        "png",
        "--no-progress",
    )
    manifest = load_manifest(out)
    assert {k: v["count"] for k, v in manifest["skipped"].items()} == {
        "duplicate_id": 1,
        "missing_report": 1,
        "empty_report": 1,
        "image_too_small": 1,
        "report_too_long": 1,
    }
    assert manifest["source"]["ignored_columns"] == ["site"]
    with tarfile.open(out / "train-000000.tar") as tar:
        assert sorted(tar.getnames()) == ["A_1.json", "A_1.png", "B.0.png", "B.1.png", "B.json"]
        import io

        from PIL import Image

        dicom_png = np.asarray(Image.open(io.BytesIO(tar.extractfile("A_1.png").read())))
    # MONOCHROME1 inverted: the top-left (lowest stored value) is the brightest.
    assert dicom_png.shape == (40, 32) and dicom_png[0, 0] > 240 and dicom_png[-1, -1] < 15
    csv_in = tmp_path / "in.csv"
    csv_in.write_text('id,image,report,split\nX,img/c.jpg,"FINDINGS: One. Two.",validate\n')
    run_cli(
        "prior_dist.shardify",
        "manifest",
        "--input",
        str(csv_in),
        "--out",
        str(tmp_path / "o2"),
        "--no-progress",
    )
    assert load_manifest(tmp_path / "o2")["splits"]["validate"]["num_samples"] == 1


def _shas(directory: Path) -> dict:
    manifest = load_manifest(directory)
    return {s["name"]: s["sha256"] for e in manifest["splits"].values() for s in e["shards"]}


def test_deterministic_across_workers_and_array_tasks_and_resume(tmp_path):
    common = [
        "--num",
        "40",
        "--seed",
        "5",
        "--shard-size",
        "6",
        "--image-size",
        "48",
        "--no-progress",
    ]
    run_cli("prior_dist.shardify", "phantom", *common, "--out", str(tmp_path / "a"))
    run_cli(
        "prior_dist.shardify", "phantom", *common, "--out", str(tmp_path / "b"), "--workers", "2"
    )
    for task in range(3):  # as a SLURM array would run them: env defaults
        env = {
            "SLURM_ARRAY_TASK_COUNT": "3",
            "SLURM_ARRAY_TASK_ID": str(task + 1),
            "SLURM_ARRAY_TASK_MIN": "1",
        }
        run_cli("prior_dist.shardify", "phantom", *common, "--out", str(tmp_path / "c"), env=env)
    assert not (tmp_path / "c" / "manifest.json").exists()
    run_cli("prior_dist.shardify", "finalize", str(tmp_path / "c"))
    assert _shas(tmp_path / "a") == _shas(tmp_path / "b") == _shas(tmp_path / "c")
    # A killed run: one shard's index never written, a temporary file left behind.
    victim = tmp_path / "a" / "train-000001"
    Path(f"{victim}.idx.json").unlink()
    (tmp_path / "a" / ".train-000001.tar.tmp.999").write_bytes(b"partial")
    proc = run_cli("prior_dist.shardify", "phantom", *common, "--out", str(tmp_path / "a"))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (
        summary["shards_written"] == 1
        and summary["shards_reused"] == len(_shas(tmp_path / "b")) - 1
    )
    assert not list((tmp_path / "a").glob(".*.tmp.*"))
    assert _shas(tmp_path / "a") == _shas(tmp_path / "b")
    # Different settings into the same directory are refused.
    proc = run_cli(
        "prior_dist.shardify",
        "phantom",
        *common[:-3],
        "--image-size",
        "64",
        "--out",
        str(tmp_path / "a"),
        check=False,
    )
    assert proc.returncode == 2 and "other settings" in proc.stderr


def test_finalize_names_missing_tasks(tmp_path):
    env = {"SLURM_ARRAY_TASK_COUNT": "2", "SLURM_ARRAY_TASK_ID": "0"}
    run_cli(
        "prior_dist.shardify",
        "phantom",
        "--num",
        "10",
        "--out",
        str(tmp_path),
        "--shard-size",
        "3",
        "--image-size",
        "32",
        "--no-progress",
        env=env,
    )
    proc = run_cli("prior_dist.shardify", "finalize", str(tmp_path), check=False)
    assert proc.returncode == 2 and "task(s) [1]" in proc.stderr


def test_verify_detects_corruption(phantom_copy):
    assert run_cli("prior_dist.shardify", "verify", str(phantom_copy)).returncode == 0
    shard = phantom_copy / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    (phantom_copy / "train-000002.tar").write_bytes(
        (phantom_copy / "train-000002.tar").read_bytes()[:3000]
    )
    proc = run_cli("prior_dist.shardify", "verify", str(phantom_copy), check=False)
    assert proc.returncode == 1
    assert "train-000001.tar: sha256" in proc.stderr and "train-000002.tar" in proc.stderr


def test_cli_help_for_every_subcommand():
    for sub in ("mimic-cxr", "manifest", "phantom", "finalize", "verify"):
        assert "usage" in run_cli("prior_dist.shardify", sub, "--help").stdout


def test_member_types_are_safe(phantom_dir):
    for tar_path in phantom_dir.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            for name in tar.getnames():
                ext = name.split(".", 1)[1]
                assert ext in ("jpg", "json", "mask.png", "0.jpg", "1.jpg"), name


def test_huge_image_is_skipped_and_counted(tmp_path):
    """A decompression bomb (header: 20000 x 20000) is skipped as unreadable_image, not a crash;
    --max-pixels sets the limit."""
    from imaging import png_claiming_size

    (tmp_path / "bomb.png").write_bytes(png_claiming_size(20000, 20000))
    (tmp_path / "ok.jpg").write_bytes(jpeg_bytes(gradient(50, 60)))
    rows = [
        {"id": "bomb", "image": "bomb.png", "report": "FINDINGS: Clear.", "split": "train"},
        {"id": "ok", "image": "ok.jpg", "report": "FINDINGS: Clear.", "split": "train"},
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    common = [
        "prior_dist.shardify",
        "manifest",
        "--input",
        str(tmp_path / "in.jsonl"),
        "--image-size",
        "32",
        "--no-progress",
    ]
    run_cli(*common, "--out", str(tmp_path / "out"))
    manifest = load_manifest(tmp_path / "out")
    assert manifest["totals"]["samples"] == 1
    assert manifest["skipped"]["unreadable_image"]["examples"] == ["bomb"]
    run_cli(*common, "--out", str(tmp_path / "small"), "--max-pixels", "1000")
    skipped = load_manifest(tmp_path / "small")["skipped"]["unreadable_image"]
    assert skipped["count"] == 2


def test_manifest_rows_of_the_wrong_shape_are_skipped_and_counted(tmp_path):
    """Well-formed JSON of the wrong type and labels outside {1, 0, -1, null} are skipped with
    the line that holds them, and every reason is printed with examples."""
    (tmp_path / "ok.jpg").write_bytes(jpeg_bytes(gradient(40, 40)))
    good = {"image": "ok.jpg", "report": "FINDINGS: Clear.", "split": "train"}
    rows = [
        {**good, "id": "good", "labels": {"Edema": 1, "Atelectasis": -1, "Nodule": None}},
        [1, 2, 3],
        {**good, "id": "r1", "report": ["x"]},
        {**good, "id": "r2", "image": 5},
        {**good, "id": "r3", "labels": {"Edema": "yes"}},
        {**good, "id": "r4", "labels": "[1,2]"},
        {**good, "id": "r5", "labels": {"Edema": True}},
        {**good, "id": "r6", "split": "val"},
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    proc = run_cli(
        "prior_dist.shardify",
        "manifest",
        "--input",
        str(tmp_path / "in.jsonl"),
        "--out",
        str(out),
        "--image-size",
        "32",
        "--no-progress",
    )
    manifest = load_manifest(out)
    assert manifest["totals"]["samples"] == 1
    skipped = manifest["skipped"]
    assert {k: v["count"] for k, v in skipped.items()} == {"bad_row": 4, "bad_labels": 3}
    assert any("in.jsonl:2: a row must be an object" in e for e in skipped["bad_row"]["examples"])
    assert any("in.jsonl:5:" in e for e in skipped["bad_labels"]["examples"])
    assert "skipped 3 (bad_labels), e.g. in.jsonl:5" in proc.stderr
    with tarfile.open(out / "train-000000.tar") as tar:
        meta = json.loads(tar.extractfile("good.json").read())
    assert meta["labels"] == {"Edema": 1.0, "Atelectasis": -1.0, "Nodule": None}


def test_mimic_reports_without_metadata_are_counted_and_a_wrong_root_fails(tmp_path):
    src = make_mimic(tmp_path)
    extra = src["reports"] / "files" / "p10" / "p10000099"
    extra.mkdir(parents=True)
    (extra / "s50000099.txt").write_text(GOOD_REPORT)  # a report no metadata row lists
    common = [
        "prior_dist.shardify",
        "mimic-cxr",
        "--images",
        str(src["images"]),
        "--metadata",
        str(src["metadata"]),
        "--image-size",
        "32",
        "--no-progress",
    ]
    run_cli(*common, "--reports", str(src["reports"]), "--out", str(tmp_path / "out"))
    manifest = load_manifest(tmp_path / "out")
    assert manifest["skipped"]["no_metadata"] == {"count": 1, "examples": ["s50000099"]}
    proc = run_cli(
        *common,
        "--reports",
        str(src["reports"] / "files"),
        "--out",
        str(tmp_path / "off"),
        check=False,
    )
    assert proc.returncode == 2
    assert f"--reports {src['reports'] / 'files'}" in proc.stderr
    assert f"--images {src['images']}" in proc.stderr
    assert not (tmp_path / "off" / "manifest.json").exists()


def test_ctrl_c_stops_shardify_quietly_and_the_same_command_resumes(tmp_path):
    """SIGINT to the group (a terminal's Ctrl-C) once the first shard is written: one line and
    exit 130, no traceback from the command or its pool workers; the same command finishes."""
    out = tmp_path / "out"
    args = ["phantom", "--num", "3000", "--out", str(out), "--image-size", "64"]
    args += ["--shard-size", "16", "--workers", "2", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "prior_dist.shardify", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )
    deadline = time.time() + 300
    while not list(out.glob("*.tar")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    assert "shardify: interrupted; finished shards are kept" in stderr
    assert "Traceback" not in stderr + stdout and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    kept = len(list(out.glob("*.tar")))
    run_cli("prior_dist.shardify", *args)
    assert load_manifest(out)["totals"]["samples"] > 0 and len(list(out.glob("*.tar"))) > kept
