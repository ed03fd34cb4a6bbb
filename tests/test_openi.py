"""`shardify openi`: the Indiana University collection's NLM XML (a hand-written fixture in
tests/data/openi, and the real reports from the torchxrayvision wheel when it is present)."""

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prior_dist.data.shards import load_manifest
from prior_dist.preparation.openi import (
    IU_LABELS,
    findings_from_mesh,
    frontal_images,
    labels_from_mesh,
    parse_report,
    read_views,
    report_text,
)
from prior_dist.preparation.phantom import FINDINGS
from prior_dist.shardify import main
from tests.imaging import png_bytes

FIXTURE = Path(__file__).parent / "data" / "openi"
REPORTS = FIXTURE / "ecgen-radiology"
WHEEL_ENV = "PRIOR_TORCHXRAYVISION_WHEEL"


def _samples(out: Path) -> dict[str, dict]:
    """key -> {"json": meta, member extension: bytes} over every shard of `out`."""
    samples: dict[str, dict] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                samples.setdefault(key, {})[ext] = json.loads(data) if ext == "json" else data
    return samples


def test_parse_report_reads_sections_terms_and_figures():
    report = parse_report((REPORTS / "2.xml").read_bytes(), "2.xml")
    assert report.uid == "CXR2"
    assert report.sections["FINDINGS"].startswith("The heart is enlarged.")
    assert report.sections["INDICATION"] == "XXXX-year-old with cough."
    assert report.major[:2] == ["Cardiomegaly/mild", "Pleural Effusion/right/small"]
    assert report.images == ["CXR2_IM-0002-1001", "CXR2_IM-0002-2001"]
    with pytest.raises(ValueError, match="7.xml: not valid XML"):
        parse_report((REPORTS / "7.xml").read_bytes(), "7.xml")


def test_deidentification_runs_become_one_word_and_only_two_sections_are_kept():
    report = parse_report((REPORTS / "2.xml").read_bytes(), "2.xml")
    report.sections["FINDINGS"] = "No XXXX XXXX, XXXX of effusion. XXXX XXXX."
    text = report_text(report)
    assert text.startswith("FINDINGS: No XXXX of effusion. XXXX.\n\nIMPRESSION: 1. Cardiomegaly")
    assert "INDICATION" not in text and "cough" not in text


def _only(**found):
    """Every IU label unmentioned but `found` (names with spaces as underscores)."""
    return {**dict.fromkeys(IU_LABELS), **{k.replace("_", " "): v for k, v in found.items()}}


@pytest.mark.parametrize(
    "major, expected",
    [
        (["normal"], {**dict.fromkeys(IU_LABELS, 0.0), "No Finding": 1.0}),
        (
            ["Cardiomegaly/mild", "Opacity/lung/base/left", "Airspace Disease/lung/base"],
            _only(Cardiomegaly=1.0, Lung_Opacity=1.0, No_Finding=0.0),
        ),
        # An unmapped finding is a finding: not normal, nothing positive.
        (["Calcified Granuloma/lung/upper lobe/left"], _only(No_Finding=0.0)),
        (
            ["Nodule/lung", "Catheters, Indwelling"],
            _only(Lung_Lesion=1.0, Support_Devices=1.0, No_Finding=0.0),
        ),
        (["No Indexing"], _only()),
        ([], _only()),
    ],
)
def test_labels_from_mesh_major_terms(major, expected):
    assert labels_from_mesh(major) == expected


def test_findings_take_the_stated_side_level_and_severity():
    drawn = findings_from_mesh(
        [
            "Pleural Effusion/bilateral/large",
            "Opacity/lung/upper lobe/left",
            "Cardiomegaly/borderline",
            "Pulmonary Atelectasis/base/left/mild",
            "Nodule",
            "Fractures, Bone/ribs/right",  # no look of its own
        ]
    )
    assert drawn == [
        {"name": "pleural_effusion", "side": "bilateral", "zone": "lower", "severity": "large"},
        {"name": "consolidation", "side": "left", "zone": "upper", "severity": ""},
        {"name": "cardiomegaly", "side": "midline", "zone": "", "severity": "mild"},
        {"name": "atelectasis", "side": "left", "zone": "lower", "severity": "mild"},
        {"name": "nodule", "side": "right", "zone": "middle", "severity": ""},
    ]


def test_views_file_decides_frontal_else_the_first_figure():
    views = read_views(FIXTURE / "projections.csv")
    assert views["6_IM-0006-1001"] == "lateral" and views["2_IM-0002-1001"] == "frontal"
    assert frontal_images(["CXR6_IM-0006-1001", "CXR6_IM-0006-2001"], views) == [
        "CXR6_IM-0006-2001"
    ]
    assert frontal_images(["CXR8_IM-0008-1001"], views) == []
    assert frontal_images(["CXR9_IM-0009-1001", "CXR9_IM-0009-2001"], views) == [
        "CXR9_IM-0009-1001"
    ]


def _png_dir(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """One PNG per figure of the fixture, each a flat grey of its own level (CXR3's first
    figure is missing); returns the directory and id -> level."""
    images = tmp_path / "png"
    images.mkdir()
    levels = {}
    for xml in sorted(REPORTS.glob("*.xml")):
        try:
            report = parse_report(xml.read_bytes(), xml.name)
        except ValueError:
            continue
        for image in report.images:
            levels[image] = 20 + 13 * len(levels)
            if image != "CXR3_IM-0003-1001":
                array = np.full((80, 64), levels[image], dtype=np.uint8)
                (images / f"{image}.png").write_bytes(png_bytes(array))
    return images, levels


def test_shardify_openi_keeps_frontal_pngs_and_counts_every_skip(tmp_path, capsys):
    images, levels = _png_dir(tmp_path)
    out = tmp_path / "shards"
    args = ["openi", "--reports", str(REPORTS), "--images", str(images)]
    args += ["--views", str(FIXTURE / "projections.csv"), "--out", str(out)]
    assert main([*args, "--image-size", "32", "--format", "png", "--no-progress"]) == 0
    manifest = load_manifest(out)
    skipped = {k: v["count"] for k, v in manifest["skipped"].items()}
    assert skipped == {
        "unreadable_xml": 1,  # 7
        "no_image": 1,  # 4
        "empty_report": 1,  # 5
        "non_frontal_only": 1,  # 8: its one figure is lateral
        "missing_image": 1,  # 3: the first figure (no view known) is not on disk
    }
    assert manifest["source"]["view_rule"] == "views file"
    samples = _samples(out)
    assert sorted(samples) == ["CXR1", "CXR2", "CXR6"]
    chosen = {"CXR1": "CXR1_IM-0001-1001", "CXR2": "CXR2_IM-0002-1001", "CXR6": "CXR6_IM-0006-2001"}
    for key, image in chosen.items():
        stored = np.asarray(Image.open(io.BytesIO(samples[key]["png"])))
        assert abs(float(stored.mean()) - levels[image]) < 1.5, key
        assert "synthetic_image" not in samples[key]["json"]
    meta = samples["CXR2"]["json"]
    assert meta["sentences"] == [
        "The heart is enlarged.",
        "Small right pleural effusion with basilar atelectasis.",
        "Cardiomegaly.",
        "Small right effusion.",
    ]
    assert meta["labels"] == _only(
        Atelectasis=1.0, Cardiomegaly=1.0, Pleural_Effusion=1.0, No_Finding=0.0
    )
    assert "skipped 1 (non_frontal_only), e.g. CXR8" in capsys.readouterr().err


def test_render_phantom_pairs_each_report_with_its_findings_drawn(tmp_path):
    out = tmp_path / "shards"
    args = ["openi", "--reports", str(REPORTS), "--render-phantom", "--out", str(out)]
    assert main([*args, "--image-size", "64", "--no-progress"]) == 0
    manifest = load_manifest(out)
    assert manifest["source"]["synthetic_images"] is True
    samples = _samples(out)
    assert sorted(samples) == ["CXR1", "CXR2", "CXR3", "CXR6", "CXR8"]
    for key, sample in samples.items():
        meta = sample["json"]
        assert meta["synthetic_image"] is True
        mask = np.asarray(Image.open(io.BytesIO(sample["mask.png"])))
        drawn = {FINDINGS[i] for i in range(len(FINDINGS)) if (mask & (1 << i)).any()}
        assert drawn == {f["name"] for f in meta["findings"]}, key
    assert {f["name"] for f in samples["CXR2"]["json"]["findings"]} == {
        "cardiomegaly",
        "pleural_effusion",
        "atelectasis",
    }
    assert samples["CXR1"]["json"]["findings"] == []


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "one of the arguments --images --render-phantom is required"),
        (["--images", "{tmp}/none"], "--images {tmp}/none: directory not found"),
        (["--images", "{tmp}"], "none of the reports' images is there"),
    ],
)
def test_openi_usage_errors_name_the_input(tmp_path, capsys, extra, message):
    extra = [e.format(tmp=tmp_path) for e in extra]
    args = ["openi", "--reports", str(REPORTS), "--out", str(tmp_path / "o"), *extra]
    try:
        code = main(args)
    except SystemExit as stop:  # argparse's own refusal
        code = stop.code
    assert code == 2
    assert message.format(tmp=tmp_path) in capsys.readouterr().err


def _wheel_reports(tmp_path: Path) -> Path:
    wheel = os.environ.get(WHEEL_ENV)
    if not wheel or not Path(wheel).is_file():
        pytest.skip(
            f"set {WHEEL_ENV} to torchxrayvision-1.5.7-py3-none-any.whl "
            "(pip download --no-deps torchxrayvision==1.5.7) to test on the real reports"
        )
    target = tmp_path / "NLMCXR_reports.tgz"
    with zipfile.ZipFile(wheel) as archive:
        target.write_bytes(archive.read("torchxrayvision/data/NLMCXR_reports.tgz"))
    return target


def test_real_iu_reports_from_the_wheel(tmp_path):
    """All 3,955 reports of the published collection, synthetic images at 32 px."""
    reports = _wheel_reports(tmp_path)
    out = tmp_path / "iu"
    args = ["openi", "--reports", str(reports), "--render-phantom", "--out", str(out)]
    assert main([*args, "--image-size", "32", "--workers", "2", "--no-progress"]) == 0
    manifest = load_manifest(out)
    assert manifest["source"]["reports_read"] == 3955
    skipped = {k: v["count"] for k, v in manifest["skipped"].items()}
    assert skipped == {"no_image": 104, "empty_report": 25}
    metas = [s["json"] for s in _samples(out).values()]
    assert len(metas) == 3955 - 104 - 25
    assert all(m["sentences"] and m["synthetic_image"] for m in metas)
    assert not any("XXXX XXXX" in s for m in metas for s in m["sentences"])
    assert all(sorted(m["labels"]) == sorted(IU_LABELS) for m in metas)
    positives = {n: sum(m["labels"][n] == 1.0 for m in metas) for n in IU_LABELS}
    assert positives["No Finding"] > 1000 and positives["Cardiomegaly"] > 300
    assert min(positives[n] for n in ("Atelectasis", "Lung Lesion", "Pleural Effusion")) > 100
