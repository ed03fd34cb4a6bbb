"""Label tables and patient splits, one reader and one rule for pretraining and downstream data."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
from collections.abc import Mapping
from pathlib import Path

SPLITS = ("train", "validate", "test")


def patient_split(subject: str, fractions: Mapping[str, float], salt: str) -> str:
    """The split of every sample of `subject`, so no patient appears in two splits.

    u = the first 8 bytes of sha256("{salt}:{subject}") as a fraction of 2**64; `test` takes
    u < fractions["test"], `validate` the next fractions["validate"], `train` the rest. The
    assignment never changes when files are added or listed in another order.
    """
    digest = hashlib.sha256(f"{salt}:{subject}".encode()).digest()
    u = int.from_bytes(digest[:8], "little") / 2**64
    test = fractions.get("test", 0.0)
    if u < test:
        return "test"
    if u < test + fractions.get("validate", 0.0):
        return "validate"
    return "train"


def _open_table(path: Path) -> io.TextIOBase:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        if path.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
        return open(path, encoding="utf-8", newline="")
    except OSError as exc:
        raise OSError(f"{path}: cannot open: {exc}") from exc


def read_csv_rows(path: str | Path, required: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """All rows of a CSV (optionally gzipped), keyed by the header's names with surrounding
    spaces removed (SIIM's header has " EncodedPixels"); fails naming the file and the missing
    columns, or what made it unreadable."""
    path = Path(path)
    try:
        with _open_table(path) as handle:
            reader = csv.DictReader(handle)
            reader.fieldnames = [name.strip() for name in (reader.fieldnames or [])]
            missing = [c for c in required if c not in reader.fieldnames]
            if missing:
                raise ValueError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
            return list(reader)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, csv.Error) as exc:
        raise ValueError(f"{path}: unreadable table: {type(exc).__name__}: {exc}") from exc
