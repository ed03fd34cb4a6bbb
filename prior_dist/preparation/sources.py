"""Input sources for shardify: MIMIC-CXR trees, user manifests (CSV/JSONL) and the phantom.

Each enumerator returns the studies to prepare (cheap metadata only; images and reports are
read later, in the workers) and the studies skipped at enumeration, counted by reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from prior_dist.data.labels import chexpert_value
from prior_dist.data.shards import SkipCounter, sanitize_key
from prior_dist.data.tables import SPLITS, patient_split, read_csv_rows
from prior_dist.preparation.openi import enumerate_reports, read_views
from prior_dist.preparation.phantom import GENERATOR_VERSION, split_for_subject

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
    # Phantom findings (Finding fields) to draw as this study's image instead of reading one:
    # the synthetic half of a real-report pair (`shardify openi --render-phantom`).
    render_findings: list[dict] | None = None


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


def _check_mimic_roots(records: list[StudyRecord], images_root: str, reports_root: str) -> None:
    """Fail when not one listed report, or not one listed image, is where the layout puts it:
    a root one folder off (e.g. `--reports .../files`) would otherwise give 0 samples, exit 0."""
    if not records:
        return
    roots = f"(--images {images_root}, --reports {reports_root})"
    if not any(Path(r.report_path).is_file() for r in records):
        raise FileNotFoundError(
            f"--reports {reports_root}: none of the {len(records)} studies' reports is there, "
            f"e.g. {records[0].report_path}; give the folder that holds files/ {roots}"
        )
    if not any(Path(p).is_file() for r in records for p in r.images):
        raise FileNotFoundError(
            f"--images {images_root}: none of the studies' images is there, e.g. "
            f"{records[0].images[0]}; give the folder that holds files/ {roots}"
        )


def _reports_without_metadata(reports_root: str, study_ids: set[str]) -> list[str]:
    """Keys of reports on disk (`files/pXX/pSUBJECT/sSTUDY.txt`) whose study has no metadata
    row: they are counted as skipped (`no_metadata`), never silently dropped."""
    found = sorted(Path(reports_root).glob("files/p*/p*/s*.txt"))
    return [sanitize_key(p.stem) for p in found if p.stem[1:] not in study_ids]


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
    studies = _mimic_studies(rows, images_root, views)
    for study_id, info in sorted(studies.items()):
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
    _check_mimic_roots(records, images_root, reports_root)
    for key in _reports_without_metadata(reports_root, set(studies)):
        skipped.add("no_metadata", key)
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


def _manifest_rows(path: Path) -> tuple[list[tuple[int, object]], list[str]]:
    """(line number, row) of a user CSV (optionally gzipped) or JSONL manifest, and its column
    names. A JSONL line that is valid JSON of another kind than an object is kept as it is, for
    the row check to skip and count."""
    if path.suffix == ".jsonl":
        rows = []
        for line_no, raw in enumerate(path.read_bytes().splitlines(), 1):
            try:
                line = raw.decode("utf-8")
                if line.strip():
                    rows.append((line_no, json.loads(line)))
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not UTF-8 text: {exc}") from exc
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: invalid JSON: {exc}") from exc
        columns = sorted({k for _, row in rows if isinstance(row, dict) for k in row})
        return rows, columns
    if path.suffix in (".csv", ".gz"):
        rows = read_csv_rows(path, ("image",))
        return [(n, row) for n, row in enumerate(rows, 2)], list(rows[0].keys()) if rows else []
    raise ValueError(f"--input {path}: expected a .csv, .csv.gz or .jsonl file")


_LABEL_VALUES = (1, 0, -1, None)


class _BadRow(ValueError):
    """A manifest row that cannot become a study; `reason` is the skip counter's key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _text(row: dict, field: str, where: str, numbers: bool = False) -> str | None:
    """`row[field]` as text (None when absent or empty); a number only where `numbers`."""
    value = row.get(field)
    if value is None or value == "":
        return None
    kinds = (str, int) if numbers else str
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise _BadRow("bad_row", f"{where}: {field} must be text, got {type(value).__name__}")
    return str(value)


def _texts(row: dict, field: str, where: str) -> list[str]:
    value = row.get(field)
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise _BadRow("bad_row", f"{where}: {field} must be text or a list of text")
        return value
    text = _text(row, field, where)
    if text is None:
        return []
    if text.strip().startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            raise _BadRow(
                "bad_row", f"{where}: {field} is not a JSON list: {text[:40]!r}"
            ) from None
        return _texts({field: parsed}, field, where)
    return [part.strip() for part in text.split(";") if part.strip()]


def _labels(row: dict, where: str) -> dict | None:
    """`labels`: an object (or its JSON text) of name -> 1, 0, -1 or null."""
    labels = row.get("labels")
    if isinstance(labels, str):
        if not labels.strip():
            return None
        try:
            labels = json.loads(labels)
        except json.JSONDecodeError:
            raise _BadRow("bad_labels", f"{where}: labels are not JSON: {labels[:40]!r}") from None
    if labels is None or labels == {}:
        return None
    if not isinstance(labels, dict):
        raise _BadRow("bad_labels", f"{where}: labels must be an object, got {labels!r:.40}")
    bad = {
        k: v
        for k, v in labels.items()
        if isinstance(v, bool) or v not in _LABEL_VALUES or not isinstance(k, str)
    }
    if bad:
        raise _BadRow("bad_labels", f"{where}: label values must be 1, 0, -1 or null: {bad!r:.60}")
    return {k: (None if v is None else float(v)) for k, v in labels.items()}


def _manifest_record(row, where: str, key: str, base: Path, fractions: dict) -> StudyRecord:
    """One manifest row as a study, or `_BadRow` (and the reason it is skipped)."""
    if not isinstance(row, dict):
        raise _BadRow("bad_row", f"{where}: a row must be an object, got {type(row).__name__}")
    images = [str(p if Path(p).is_absolute() else base / p) for p in _texts(row, "image", where)]
    if not images:
        raise _BadRow("no_image", key)
    report_path = _text(row, "report_path", where)
    if report_path and not Path(report_path).is_absolute():
        report_path = str(base / report_path)
    report_text = _text(row, "report", where)
    if report_text is None and report_path is None:
        given = isinstance(row.get("report"), str)  # there, but empty
        raise _BadRow("empty_report" if given else "missing_report", key)
    labels = _labels(row, where)
    split = _text(row, "split", where)
    if split is not None and split not in SPLITS:
        raise _BadRow("bad_row", f"{where}: split must be one of {list(SPLITS)}, got {split!r}")
    subject_id = _text(row, "subject_id", where, numbers=True)
    return StudyRecord(
        key=key,
        split=split or patient_split(subject_id or key, fractions, PATIENT_SALT),
        subject_id=subject_id,
        images=images,
        views=_texts(row, "views", where),
        report_text=report_text,
        report_path=report_path,
        labels=labels,
    )


def enumerate_manifest(
    input_path: str, val_fraction: float, test_fraction: float
) -> tuple[list[StudyRecord], SkipCounter, dict]:
    """Studies from a user CSV or JSONL (paths relative to the file's directory). A row of the
    wrong shape (not an object, a field of the wrong type, labels other than 1/0/-1/null) is
    skipped and counted with its line number."""
    path = Path(input_path)
    if not path.is_file():
        raise FileNotFoundError(f"--input {path}: file not found")
    rows, columns = _manifest_rows(path)
    fractions = {"validate": val_fraction, "test": test_fraction}
    skipped = SkipCounter()
    seen: set[str] = set()
    records = []
    for row_no, (line, row) in enumerate(rows):
        where = f"{path.name}:{line}"
        raw_id = row.get("id") if isinstance(row, dict) else None
        key = sanitize_key(str(raw_id) if raw_id not in (None, "") else f"row{row_no:08d}")
        if key in seen:
            skipped.add("duplicate_id", key)
            continue
        seen.add(key)
        try:
            records.append(_manifest_record(row, where, key, path.parent, fractions))
        except _BadRow as bad:
            skipped.add(bad.reason, str(bad))
    ignored = sorted(set(columns) - _MANIFEST_COLUMNS)
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


def enumerate_openi(
    reports: str,
    images_root: str | None,
    views_file: str | None,
    render: bool,
    val_fraction: float,
    test_fraction: float,
) -> tuple[list[StudyRecord], SkipCounter, dict]:
    """Reports of the Indiana University collection with their frontal PNGs, or, with `render`,
    with images the phantom renderer draws from each report's MeSH findings."""
    if render == (images_root is not None):
        raise ValueError(
            "openi: give --images PNG_DIR (the collection's images) or --render-phantom "
            "(synthetic images drawn from each report's findings), not both or neither"
        )
    if images_root is not None and not Path(images_root).is_dir():
        raise FileNotFoundError(f"--images {images_root}: directory not found")
    views = read_views(views_file) if views_file else {}
    skipped = SkipCounter()
    fractions = {"validate": val_fraction, "test": test_fraction}
    studies, read = enumerate_reports(reports, views, fractions, PATIENT_SALT, skipped)
    if read == 0:
        raise FileNotFoundError(f"--reports {reports}: no report XML files there")
    records = [
        StudyRecord(
            key=study.key,
            split=study.split,
            subject_id=study.key,
            images=[] if render else [str(Path(images_root, f"{i}.png")) for i in study.images],
            views=[] if render else ["frontal"] * len(study.images),
            report_text=study.text,
            labels=study.labels,
            render_findings=study.findings if render else None,
        )
        for study in studies
    ]
    if images_root is not None and records:
        if not any(Path(p).is_file() for r in records for p in r.images):
            raise FileNotFoundError(
                f"--images {images_root}: none of the reports' images is there, e.g. "
                f"{records[0].images[0]}; give the folder holding the <image id>.png files"
            )
    source = {
        "kind": "openi",
        "reports": str(reports),
        "images": images_root,
        "synthetic_images": render,
        "views": views_file,
        "view_rule": "views file" if views_file else "first figure",
        "reports_read": read,
    }
    return records, skipped, source
