"""Radiology report preparation: section extraction and sentence splitting.

Rules only (no stanza or punkt models: nothing can be downloaded on the machines this runs on).
The rules target the MIMIC-CXR free-text layout and the IU X-ray / Open-I style
(`XXXX` de-identification), and are tested on the nasty cases in `tests/test_reports.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# Header names that map to the two sections PRIOR keeps. Anything else that looks like a
# header ("INDICATION:", "COMPARISON:", "WET READ:") ends the previous section.
_FINDINGS_NAMES = {"FINDINGS", "FINDING", "REPORT FINDINGS", "FINDINGS/DISCUSSION"}
_IMPRESSION_NAMES = {"IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS", "SUMMARY"}
_COMBINED_NAMES = {
    "FINDINGS AND IMPRESSION",
    "FINDINGS/IMPRESSION",
    "FINDINGS & IMPRESSION",
    "IMPRESSION AND FINDINGS",
    "IMPRESSION/FINDINGS",
    "FINDINGS IMPRESSION",
}
_KNOWN = _FINDINGS_NAMES | _IMPRESSION_NAMES | _COMBINED_NAMES

# A header is a short run of letters (with spaces, '/', '&') at the start of a line, then ':'.
_HEADER_RE = re.compile(r"^[ \t]*([A-Za-z][A-Za-z /&()\-]{0,60}?)[ \t]*:", re.MULTILINE)

# Abbreviations whose period never ends a sentence.
_ABBREVIATIONS = [
    "dr",
    "drs",
    "mr",
    "mrs",
    "ms",
    "prof",
    "vs",
    "approx",
    "appt",
    "st",
    "no",
    "nos",
    "fig",
    "figs",
    "cf",
    "resp",
    "sr",
    "jr",
    "pt",
    "pts",
    "hx",
    "dx",
    "incl",
    "apprx",
]
_ABBREV_RE = re.compile(r"\b(" + "|".join(_ABBREVIATIONS) + r")\.(?=\s|$)", re.IGNORECASE)
# "e.g.", "i.e.", "a.m.", "p.m.": internal periods protected; the last one may end a sentence
# only for a.m./p.m. (a time can close a sentence, "e.g." cannot).
_EG_RE = re.compile(r"\b(e)\.(g)\.|\b(i)\.(e)\.", re.IGNORECASE)
_AMPM_RE = re.compile(r"\b([ap])\.(m)\.", re.IGNORECASE)
_DECIMAL_RE = re.compile(r"(?<=\d)\.(?=\d)")
# Numbered list markers: "1. ", "2) " at the start of a line or after a sentence end.
_LIST_MARKER_RE = re.compile(r"(^|\n|(?<=[.!?:;])\s)\s*\(?(\d{1,2})[.)]\s+(?=\S)")
_PROTECT = "\x00"
_BOUNDARY = "\x01"
# A sentence ends at . ! ? followed by space and a plausible sentence start.
_SPLIT_RE = re.compile(r"([.!?])\s+(?=[A-Z0-9_\"'(\[]|XXXX)")
_HAS_WORD_RE = re.compile(r"[A-Za-z]{2,}")
_DEID_RE = re.compile(r"_{2,}|X{3,}")


@dataclass
class ParsedReport:
    """The two sections PRIOR keeps and their sentences (findings first, then impression)."""

    findings: str = ""
    impression: str = ""
    sentences: list[str] = field(default_factory=list)
    combined_header: bool = False

    @property
    def has_sections(self) -> bool:
        return bool(self.findings or self.impression)


def _normalise_header(name: str) -> str:
    name = re.sub(r"\s+", " ", name.strip()).upper()
    # Letter-spaced headers such as "F I N D I N G S".
    parts = name.split(" ")
    if len(parts) > 3 and all(len(p) == 1 for p in parts):
        name = "".join(parts)
    return name


def _is_header(raw: str) -> str | None:
    """Return the normalised header name if `raw` is a section header, else None."""
    name = _normalise_header(raw)
    if name in _KNOWN:
        return name
    # Unknown headers count only when written in capitals (MIMIC style); lower-case
    # "The heart: normal" is prose, not a header.
    letters = [c for c in raw if c.isalpha()]
    if len(letters) >= 3 and all(c.isupper() for c in letters) and len(name.split()) <= 5:
        return name
    return None


def extract_sections(text: str) -> ParsedReport:
    """Split a free-text report into FINDINGS and IMPRESSION (empty strings when absent)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    headers = []
    for match in _HEADER_RE.finditer(text):
        name = _is_header(match.group(1))
        if name is not None:
            headers.append((match.start(), match.end(), name))
    findings: list[str] = []
    impression: list[str] = []
    combined = False
    for i, (_, body_start, name) in enumerate(headers):
        body_end = headers[i + 1][0] if i + 1 < len(headers) else len(text)
        body = text[body_start:body_end].strip()
        if not body:
            continue
        if name in _FINDINGS_NAMES:
            findings.append(body)
        elif name in _IMPRESSION_NAMES:
            impression.append(body)
        elif name in _COMBINED_NAMES:
            combined = True
            findings.append(body)
    report = ParsedReport(
        findings=clean_whitespace("\n\n".join(findings)),
        impression=clean_whitespace("\n\n".join(impression)),
        combined_header=combined,
    )
    report.sentences = split_sentences(report.findings) + split_sentences(report.impression)
    return report


def clean_whitespace(text: str) -> str:
    """Collapse runs of spaces and tabs, keep paragraph breaks (blank lines), strip."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    text = re.sub(r"[ \u00a0]+", " ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def split_sentences(text: str) -> list[str]:
    """Split radiology prose into sentences.

    Handles abbreviations ("Dr."), decimals ("1.5 cm"), numbered lists ("1. ... 2. ..."),
    de-identification tokens (``___``, ``XXXX``), line-wrapped text and paragraph breaks.
    """
    if not text.strip():
        return []
    text = clean_whitespace(text)
    # Numbered list items start new sentences; the marker itself is dropped.
    text = _LIST_MARKER_RE.sub(lambda m: (m.group(1) or "") + _BOUNDARY, text)
    # Paragraph breaks are boundaries; single newlines are line wrapping.
    text = re.sub(r"\n\s*\n", _BOUNDARY, text)
    text = text.replace("\n", " ")
    text = _DECIMAL_RE.sub(_PROTECT, text)
    text = _ABBREV_RE.sub(lambda m: m.group(1) + _PROTECT, text)
    text = _EG_RE.sub(
        lambda m: (m.group(1) or m.group(3)) + _PROTECT + (m.group(2) or m.group(4)) + _PROTECT,
        text,
    )
    text = _AMPM_RE.sub(lambda m: m.group(1) + _PROTECT + m.group(2) + ".", text)
    text = _SPLIT_RE.sub(lambda m: m.group(1) + _BOUNDARY, text)
    sentences = []
    for piece in text.split(_BOUNDARY):
        piece = re.sub(r"\s+", " ", piece.replace(_PROTECT, ".")).strip(" ;,")
        # A sentence made only of de-identification tokens ("XXXX.") carries nothing.
        if piece and _HAS_WORD_RE.search(_DEID_RE.sub(" ", piece)):
            sentences.append(piece)
    return sentences


def decode_report_bytes(data: bytes) -> tuple[str, bool]:
    """Decode report bytes as UTF-8; fall back to cp1252/latin-1. Returns (text, was_clean)."""
    try:
        return data.decode("utf-8"), True
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), False
    except UnicodeDecodeError:
        return data.decode("latin-1"), False
