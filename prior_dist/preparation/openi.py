"""The Indiana University chest X-ray collection (OpenI) as a shardify source.

Published layout: one NLM XML file per report (`ecgen-radiology/<n>.xml`, or the `.tgz` that
holds them) with the report's sections (`AbstractText` labelled COMPARISON, INDICATION,
FINDINGS, IMPRESSION), its MeSH terms (`major`: what the indexers found, `Term/qualifier/...`;
`automatic`: terms a program found in the text) and its images (`parentImage id=` in figure
order), and a directory of PNGs named `<parentImage id>.png`.

One sample per report: FINDINGS and IMPRESSION through the report rules of
`prior_dist.preparation.reports`, its frontal image(s), labels from the MeSH major terms
(`MESH_TO_CHEXPERT`, docs/data.md), the split from the report id. Without the PNGs, `render`
pairs each real report with an image the phantom renderer draws from the report's MeSH findings
(side, level, severity): synthetic pairs, marked as such in the manifest and in every sample.
"""

from __future__ import annotations

import csv
import gzip
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prior_dist.data.shards import SkipCounter, sanitize_key
from prior_dist.data.tables import patient_split
from prior_dist.preparation.phantom import Finding

# MeSH major term (its first component) -> CheXpert label, where the meaning is the same.
# Left out on purpose: Density (bone or lung), Pulmonary Congestion (CheXpert's labeller does
# not call it edema), Cardiac Shadow/Mediastinum "enlarged" (cardiomegaly or a mass), Stents.
MESH_TO_CHEXPERT = {
    "Cardiomegaly": "Cardiomegaly",
    "Pulmonary Atelectasis": "Atelectasis",
    "Pleural Effusion": "Pleural Effusion",
    "Opacity": "Lung Opacity",
    "Airspace Disease": "Lung Opacity",
    "Infiltrate": "Lung Opacity",
    "Consolidation": "Consolidation",
    "Pneumonia": "Pneumonia",
    "Pulmonary Edema": "Edema",
    "Pneumothorax": "Pneumothorax",
    "Fractures, Bone": "Fracture",
    "Nodule": "Lung Lesion",
    "Mass": "Lung Lesion",
    "Catheters, Indwelling": "Support Devices",
    "Tube, Inserted": "Support Devices",
    "Implanted Medical Device": "Support Devices",
    "Medical Device": "Support Devices",
}
NORMAL_TERM = "normal"
IU_LABELS = (*sorted(set(MESH_TO_CHEXPERT.values())), "No Finding")

# CheXpert label -> the phantom finding drawn for it in synthetic pairs (Lung Opacity,
# Consolidation and Pneumonia share the look of a patchy airspace opacity; Fracture: none).
RENDERED = {
    "Cardiomegaly": "cardiomegaly",
    "Atelectasis": "atelectasis",
    "Pleural Effusion": "pleural_effusion",
    "Lung Opacity": "consolidation",
    "Consolidation": "consolidation",
    "Pneumonia": "consolidation",
    "Edema": "edema",
    "Pneumothorax": "pneumothorax",
    "Lung Lesion": "nodule",
    "Support Devices": "support_devices",
}
_ZONES = {
    "upper lobe": "upper",
    "apex": "upper",
    "middle lobe": "middle",
    "lingula": "middle",
    "hilum": "middle",
    "lower lobe": "lower",
    "base": "lower",
}
_SEVERITY = {
    "mild": "mild",
    "minimal": "mild",
    "borderline": "mild",
    "small": "small",
    "moderate": "moderate",
    "severe": "severe",
    "large": "large",
}
# Where the renderer needs a side, level or severity the terms do not give.
_DEFAULTS = {
    "cardiomegaly": ("midline", "", "mild"),
    "atelectasis": ("right", "lower", ""),
    "pleural_effusion": ("right", "lower", "moderate"),
    "consolidation": ("right", "middle", ""),
    "edema": ("bilateral", "", "moderate"),
    "pneumothorax": ("right", "apical", "moderate"),
    "nodule": ("right", "middle", ""),
    "support_devices": ("midline", "", ""),
}
# Each renderer severity scale, mildest first: a stated severity takes its place on it.
_SEVERITIES = {
    "atelectasis": ("mild", "moderate", "moderate"),
    "cardiomegaly": ("mild", "moderate", "severe"),
    "consolidation": ("", "moderate", "severe"),
    "pleural_effusion": ("small", "moderate", "large"),
    "pneumothorax": ("small", "moderate", "large"),
    "edema": ("mild", "moderate", "severe"),
}
_RANK = {"mild": 0, "small": 0, "moderate": 1, "severe": 2, "large": 2}
FRONTAL = ("PA", "AP", "FRONTAL", "POSTEROANTERIOR", "ANTEROPOSTERIOR")
LATERAL = ("LL", "RL", "LATERAL", "LARGE LATERAL", "LAT")
_DEID_RUN = re.compile(r"XXXX(?:[\s,]+XXXX)+")


@dataclass
class IUReport:
    uid: str  # "CXR1000"
    sections: dict[str, str]  # label (FINDINGS, IMPRESSION, ...) -> text
    major: list[str] = field(default_factory=list)  # MeSH major terms as written
    images: list[str] = field(default_factory=list)  # parentImage ids, in figure order


def parse_report(data: bytes, where: str) -> IUReport:
    """One NLM report XML; a ValueError names `where` when it is not one."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as err:
        raise ValueError(f"{where}: not valid XML: {err}") from None
    uid = root.find("uId")
    if uid is None or not uid.get("id"):
        raise ValueError(f"{where}: no <uId id=...>")
    sections = {
        (node.get("Label") or "").strip().upper(): " ".join((node.text or "").split())
        for node in root.iter("AbstractText")
    }
    return IUReport(
        uid=uid.get("id"),
        sections=sections,
        major=[(m.text or "").strip() for m in root.iter("major") if (m.text or "").strip()],
        images=[p.get("id") for p in root.findall("parentImage") if p.get("id")],
    )


def read_xml_files(path: str | Path) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every report XML under a directory or inside a .tgz/.tar.gz/.tar, read
    in memory (nothing is extracted to disk)."""
    path = Path(path)
    if path.is_dir():
        for file in sorted(path.rglob("*.xml")):
            yield str(file), file.read_bytes()
        return
    if not path.is_file():
        raise FileNotFoundError(f"--reports {path}: no such directory or archive")
    try:
        archive = tarfile.open(path, "r:*")
    except tarfile.TarError as err:
        raise ValueError(f"--reports {path}: not a directory or a tar archive: {err}") from None
    with archive:
        for member in archive:
            if member.isfile() and member.name.endswith(".xml"):
                yield f"{path}:{member.name}", archive.extractfile(member).read()


def report_text(report: IUReport) -> str:
    """FINDINGS and IMPRESSION as a sectioned report for the report rules. De-identification
    (`XXXX`) stays where it stood, one unknown word for a run of them: the words around it keep
    their meaning ("No XXXX of pneumothorax"); a sentence left with nothing else is dropped by
    the rules."""
    parts = []
    for label in ("FINDINGS", "IMPRESSION"):
        text = _DEID_RUN.sub("XXXX", report.sections.get(label, ""))
        if text.strip():
            parts.append(f"{label}: {text.strip()}")
    return "\n\n".join(parts)


def _term(major: str) -> tuple[str, list[str]]:
    head, *qualifiers = [p.strip() for p in major.split("/")]
    return head, [q.lower() for q in qualifiers]


def labels_from_mesh(major: list[str]) -> dict[str, float | None]:
    """Every CheXpert label of `IU_LABELS` from MeSH major terms: a mapped term is positive (1);
    a report indexed `normal` is negative (0) for every label and positive for No Finding;
    otherwise a label without a term is unmentioned (None, as CheXpert's blank) and No Finding
    is 0. A report not indexed (`No Indexing`, no terms) has every label unmentioned."""
    heads = {_term(m)[0] for m in major}
    if not heads or heads <= {"No Indexing"}:
        return dict.fromkeys(IU_LABELS)
    if heads == {NORMAL_TERM}:
        return {**dict.fromkeys(IU_LABELS, 0.0), "No Finding": 1.0}
    found = {MESH_TO_CHEXPERT[h] for h in heads if h in MESH_TO_CHEXPERT}
    return {name: 1.0 if name in found else None for name in IU_LABELS} | {"No Finding": 0.0}


def findings_from_mesh(major: list[str]) -> list[dict]:
    """The phantom findings that show a report's mapped MeSH terms at the side, level and
    severity they state (defaults where they state none), one per finding and side."""
    drawn: dict[tuple[str, str], dict] = {}
    for term in major:
        head, qualifiers = _term(term)
        name = RENDERED.get(MESH_TO_CHEXPERT.get(head, ""))
        if name is None:
            continue
        side, zone, severity = _DEFAULTS[name]
        sides = [q for q in qualifiers if q in ("left", "right", "bilateral")]
        if sides and name not in ("cardiomegaly", "support_devices", "edema"):
            side = sides[0]
        zones = [_ZONES[q] for q in qualifiers if q in _ZONES]
        if zones and name in ("consolidation", "nodule"):
            zone = zones[0]
        severities = [_SEVERITY[q] for q in qualifiers if q in _SEVERITY]
        if severities and name in _SEVERITIES:
            severity = _SEVERITIES[name][_RANK[severities[0]]]
        finding = Finding(name, side, zone, severity)
        drawn.setdefault((name, side), finding.__dict__)
    return list(drawn.values())


def _view_key(name: str) -> str:
    """An image id from a file name or id: `CXR1000_IM-0003-1001`, `1000_IM-0003-1001.dcm.png`
    and `./1000_IM-0003-1001.dcm` all give `1000_IM-0003-1001`."""
    stem = Path(name.strip()).name
    for suffix in (".png", ".jpg", ".dcm"):
        stem = stem.removesuffix(suffix)
    return stem.removeprefix("CXR")


def read_views(path: str | Path) -> dict[str, str]:
    """Image id -> "frontal" | "lateral" from a CSV (optionally gzipped) with an id column
    (filename, imageid, image or id) and a view column (projection, view, View Position or
    ViewPosition): e.g. the per-image projections list users keep beside the PNGs."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        id_col = next((c for c in ("filename", "imageid", "image", "id") if c in columns), None)
        view_col = next(
            (c for c in ("projection", "view", "View Position", "ViewPosition") if c in columns),
            None,
        )
        if id_col is None or view_col is None:
            raise ValueError(
                f"--views {path}: needs an id column (filename, imageid, image or id) and a "
                f"view column (projection, view, View Position or ViewPosition); has {columns}"
            )
        views = {}
        for row in reader:
            value = (row[view_col] or "").strip().upper()
            kind = "frontal" if value in FRONTAL else "lateral" if value in LATERAL else None
            if kind:
                views[_view_key(row[id_col])] = kind
    return views


def frontal_images(images: list[str], views: dict[str, str]) -> list[str]:
    """The report's images to keep: those the views file calls frontal; none when it calls them
    all lateral; with no view for any of them, the first figure (in this collection the first
    figure is the frontal view for most reports: docs/data.md gives the count)."""
    known = {i: views.get(_view_key(i)) for i in images}
    frontal = [i for i in images if known[i] == "frontal"]
    if frontal:
        return frontal
    if any(known.values()):
        return []
    return images[:1]


@dataclass
class OpenIStudy:
    """What enumeration keeps of one report: the record's fields, before any image is read."""

    key: str
    split: str
    images: list[str]
    text: str
    labels: dict[str, float | None]
    findings: list[dict]


def enumerate_reports(
    reports: str | Path,
    views: dict[str, str],
    fractions: dict[str, float],
    salt: str,
    skipped: SkipCounter,
) -> tuple[list[OpenIStudy], int]:
    """Every report under `reports` as a study, and how many files were read; reports that
    cannot be used are counted in `skipped` (unreadable_xml, duplicate_id, no_image,
    empty_report, non_frontal_only)."""
    studies: dict[str, OpenIStudy] = {}
    read = 0
    for where, data in read_xml_files(reports):
        read += 1
        try:
            report = parse_report(data, where)
        except ValueError as err:
            skipped.add("unreadable_xml", str(err))
            continue
        key = sanitize_key(report.uid)
        if key in studies:
            skipped.add("duplicate_id", f"{key} ({where})")
            continue
        text = report_text(report)
        if not report.images:
            skipped.add("no_image", key)
        elif not text:
            skipped.add("empty_report", key)
        elif not (images := frontal_images(report.images, views)):
            skipped.add("non_frontal_only", key)
        else:
            studies[key] = OpenIStudy(
                key=key,
                split=patient_split(report.uid, fractions, salt),
                images=images,
                text=text,
                labels=labels_from_mesh(report.major),
                findings=findings_from_mesh(report.major),
            )
    ordered = sorted(studies.values(), key=lambda s: (len(s.key), s.key))
    return ordered, read
