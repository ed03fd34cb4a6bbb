"""Input sources for shardify: MIMIC-CXR trees, user manifests (CSV/JSONL) and the phantom.

Each enumerator returns the studies to prepare (cheap metadata only; images and reports are
read later, in the workers) and the studies skipped at enumeration, counted by reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from prior_dist.data.labels import chexpert_value
from prior_dist.data.phantom import GENERATOR_VERSION, split_for_subject
from prior_dist.data.shards import SkipCounter, sanitize_key
from prior_dist.data.tables import patient_split, read_csv_rows

FRONTAL_VIEWS = ("PA", "AP")
# The salt of pretraining sources' patient splits (changing it moves patients between splits).
PATIENT_SALT = "prior_dist"


@dataclass
class StudyRecord:
    key: str
    split: str
    subject_id: str | None = None
    images: list[str] = field(default_factory=list)  # paths; empty for phantom studies
    views: list[str] = field(default_factory=list)
    report_text: str | None = None
    report_path: str | None = None
    labels: dict | None = None
    phantom_index: int | None = None


def _mimic_studies(rows: list[dict], images_root: str, views: tuple[str, ...]) -> dict:
    """Metadata rows grouped by study: the subject and the image paths and views of the
    study's images in `views`."""
    studies: dict[str, dict] = {}
    for row in rows:
        study = studies.setdefault(
            row["study_id"], {"subject": row["subject_id"], "frontal": [], "views": [], "all": 0}
        )
        study["all"] += 1
        view = row["ViewPosition"].strip().upper()
        if view in views:
            subject = row["subject_id"]
            folder = Path(images_root) / "files" / f"p{subject[:2]}" / f"p{subject}"
            study["frontal"].append(str(folder / f"s{row['study_id']}" / f"{row['dicom_id']}.jpg"))
            study["views"].append(view)
    return studies


def enumerate_mimic(
    images_root: str,
    reports_root: str,
    metadata: str,
    split_file: str | None,
    labels_file: str | None,
    views: tuple[str, ...],
    val_fraction: float,
    test_fraction: float,
) -> tuple[list[StudyRecord], SkipCounter, dict]:
    """Studies of MIMIC-CXR-JPG + MIMIC-CXR reports, one record per study with its frontal
    images."""
    for root, what in ((images_root, "--images"), (reports_root, "--reports")):
        if not Path(root).is_dir():
            raise FileNotFoundError(f"{what} {root}: directory not found")
    rows = read_csv_rows(metadata, ("dicom_id", "subject_id", "study_id", "ViewPosition"))
    split_by_study: dict[str, str] = {}
    if split_file:
        for row in read_csv_rows(split_file, ("study_id", "split")):
            split_by_study[row["study_id"]] = row["split"]
    labels_by_study: dict[str, dict] = {}
    if labels_file:
        for row in read_csv_rows(labels_file, ("study_id",)):
            labels_by_study[row["study_id"]] = {
                k: chexpert_value(v) for k, v in row.items() if k not in ("subject_id", "study_id")
            }
    skipped = SkipCounter()
    records = []
    for study_id, info in sorted(_mimic_studies(rows, images_root, views).items()):
        key = sanitize_key(f"s{study_id}")
        if not info["frontal"]:
            skipped.add("non_frontal_only", key)
            continue
        subject = info["subject"]
        split = split_by_study.get(study_id) or patient_split(
            subject, {"validate": val_fraction, "test": test_fraction}, PATIENT_SALT
        )
        report_path = (
            Path(reports_root) / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study_id}.txt"
        )
        records.append(
            StudyRecord(
                key=key,
                split=split,
                subject_id=subject,
                images=info["frontal"],
                views=info["views"],
                report_path=str(report_path),
                labels=labels_by_study.get(study_id),
            )
        )
    source = {
        "kind": "mimic-cxr",
        "images": str(images_root),
        "reports": str(reports_root),
        "metadata": str(metadata),
        "split": split_file,
        "labels": labels_file,
        "views": list(views),
        "metadata_rows": len(rows),
    }
    return records, skipped, source


_MANIFEST_COLUMNS = {
    "id",
    "image",
    "report",
    "report_path",
    "split",
    "labels",
    "subject_id",
    "views",
}


def _as_list(value) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    text = str(value).strip()
    if text.startswith("["):
        return [str(v) for v in json.loads(text)]
    return [part.strip() for part in text.split(";") if part.strip()]


def _manifest_rows(path: Path) -> tuple[list[dict], list[str]]:
    """The rows of a user CSV (optionally gzipped) or JSONL manifest, and its column names."""
    if path.suffix == ".jsonl":
        rows = []
        for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{line_no}: invalid JSON: {exc}") from exc
        return rows, sorted({k for row in rows for k in row})
    if path.suffix in (".csv", ".gz"):
        rows = read_csv_rows(path, ("image",))
        return rows, list(rows[0].keys()) if rows else []
    raise ValueError(f"--input {path}: expected a .csv, .csv.gz or .jsonl file")


def enumerate_manifest(
    input_path: str, val_fraction: float, test_fraction: float
) -> tuple[list[StudyRecord], SkipCounter, dict]:
    """Studies from a user CSV or JSONL (paths relative to the file's directory)."""
    path = Path(input_path)
    if not path.is_file():
        raise FileNotFoundError(f"--input {path}: file not found")
    base = path.parent
    rows, columns = _manifest_rows(path)
    ignored = sorted(set(columns) - _MANIFEST_COLUMNS)
    skipped = SkipCounter()
    seen: set[str] = set()
    records = []
    for row_no, row in enumerate(rows):
        raw_id = row.get("id") or f"row{row_no:08d}"
        key = sanitize_key(raw_id)
        if key in seen:
            skipped.add("duplicate_id", key)
            continue
        seen.add(key)
        images = [str(p if Path(p).is_absolute() else base / p) for p in _as_list(row.get("image"))]
        if not images:
            skipped.add("no_image", key)
            continue
        report_path = row.get("report_path") or None
        if report_path and not Path(report_path).is_absolute():
            report_path = str(base / report_path)
        report_text = row.get("report") or None
        if report_text is None and report_path is None:
            skipped.add("missing_report", key)
            continue
        labels = row.get("labels")
        if isinstance(labels, str) and labels.strip():
            try:
                labels = json.loads(labels)
            except json.JSONDecodeError:
                skipped.add("bad_labels", key)
                continue
        subject = str(row.get("subject_id") or key)
        split = row.get("split") or patient_split(
            subject, {"validate": val_fraction, "test": test_fraction}, PATIENT_SALT
        )
        records.append(
            StudyRecord(
                key=key,
                split=str(split),
                subject_id=row.get("subject_id") or None,
                images=images,
                views=_as_list(row.get("views")),
                report_text=report_text,
                report_path=report_path,
                labels=labels or None,
            )
        )
    source = {"kind": "manifest", "input": str(path), "rows": len(rows), "ignored_columns": ignored}
    return records, skipped, source


def enumerate_phantom(
    num: int, seed: int, studies_per_subject: int = 2
) -> tuple[list[StudyRecord], SkipCounter, dict]:
    records = []
    for index in range(num):
        subject = index // studies_per_subject
        records.append(
            StudyRecord(
                key=f"ph{seed:04d}s{index:08d}",
                split=split_for_subject(seed, subject),
                subject_id=f"ph{seed:04d}p{subject:08d}",
                phantom_index=index,
            )
        )
    return (
        records,
        SkipCounter(),
        {"kind": "phantom", "num": num, "seed": seed, "generator": GENERATOR_VERSION},
    )
