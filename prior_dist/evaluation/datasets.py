"""Downstream datasets: one sample type for every evaluation task, and adapters for the layouts
users hold.

`open_dataset(spec, split)` takes `DIR` (shards written by `python -m prior_dist.shardify`, the
default after pretraining) or `KIND:PATH` with KIND one of:

- `chexpert:ROOT` - CheXpert `train.csv` / `valid.csv` (the official validation set is the test
  split, as in most papers since the real test set is hidden); `uncertain=` chooses what the
  -1 labels become: `ignore` (default; left out of losses and AUCs), `ones` or `zeros`.
- `chexpert5x200:FILE.json` - the 5x200 zero-shot set: `{"classes": [...], "images":
  [{"path": ..., "label": ...}]}` or `{class: [paths]}`, paths relative to the file. Test only.
- `rsna:ROOT` - RSNA Pneumonia `stage_2_train_labels.csv` (boxes; filled boxes are the
  segmentation masks) with DICOM images in `stage_2_train_images/`.
- `siim:ROOT` - SIIM-ACR pneumothorax `train-rle.csv` (the competition's relative, column-major
  run-length code, `-1` for empty) with DICOM or PNG images found anywhere under ROOT.
- `covidx:ROOT` - COVIDx `train.txt` / `test.txt` label files (`patient file label source`) with
  images in `train/` and `test/`.

Splits come from `SPLIT_RULES` below (seeded hashes of patient ids, committed with the code), or
from an explicit `--split-file` (`{"train": [ids], "validate": [...], "test": [...]}`) that
`python -m prior_dist.evaluate splits` writes. Unreadable images are skipped and counted; a
missing file or column fails at once with its name.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from prior_dist.data.images import ImageDecodeError, decode_grayscale
from prior_dist.data.index import ShardReader, ShardSource, SplitIndex
from prior_dist.data.labels import CHEXPERT_COMPETITION, PHANTOM_FINDINGS, chexpert_value
from prior_dist.data.tables import SPLITS, patient_split, read_csv_rows
from prior_dist.data.transforms import image_members

UncertainPolicy = Literal["ignore", "ones", "zeros"]
# The committed split rules: subjects go to a split by `patient_split` (a salted hash of their
# id), so a split never changes when files are added or the listing order differs.
SPLIT_SALT = "prior_dist-downstream-2023"
SPLIT_RULES = {
    "chexpert": {"validate": 0.1},  # test: valid.csv
    "rsna": {"validate": 0.2, "test": 0.2},
    "siim": {"validate": 0.2, "test": 0.2},
    "covidx": {"validate": 0.1},  # test: test.txt
}


@dataclass
class Sample:
    key: str
    image: Image.Image  # 8-bit grayscale, native size
    labels: np.ndarray  # float32 [C], NaN = unknown or ignored
    masks: np.ndarray | None = None  # bool [M, H, W], one per mask class
    boxes: np.ndarray | None = None  # float32 [K, 4] x0 y0 x1 y1 in image pixels
    box_labels: np.ndarray | None = None  # int64 [K], index into box_classes
    text: str | None = None


@dataclass
class Record:
    key: str
    subject: str
    load: Callable[[], Sample]


@dataclass
class DownstreamSet:
    """One split of one dataset: records that load on demand, and what they carry."""

    name: str
    split: str
    classes: tuple[str, ...]
    records: list[Record]
    exclusive: bool = False  # every sample has exactly one class
    mask_classes: tuple[str, ...] = ()
    box_classes: tuple[str, ...] = ()
    skipped: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Sample:
        return self.records[i].load()

    @property
    def keys(self) -> list[str]:
        return [r.key for r in self.records]

    def split_digest(self) -> str:
        return hashlib.sha256("\n".join(sorted(self.keys)).encode()).hexdigest()


def hashed_split(subject: str, dataset: str) -> str:
    """The split of `subject` under `dataset`'s committed rule."""
    return patient_split(subject, SPLIT_RULES[dataset], SPLIT_SALT)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} not found")
    return path


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict]:
    return read_csv_rows(_require(path, "label file"), columns)


def _decode(path: Path) -> Image.Image:
    return decode_grayscale(_require(path, "image").read_bytes(), path.suffix)


def _onehot(index: int, size: int) -> np.ndarray:
    out = np.zeros(size, dtype=np.float32)
    out[index] = 1.0
    return out


# --- shards ----------------------------------------------------------------------------------


def _shard_set(directory: str, split: str) -> DownstreamSet:
    index = SplitIndex([ShardSource(directory)], split)
    reader = ShardReader()
    probe = reader.members(index, 0) if len(index) else {}
    meta = json.loads(probe["json"]) if probe else {}
    classes = tuple(meta.get("labels", {}))
    has_masks = "mask.png" in probe
    mask_classes = tuple(PHANTOM_FINDINGS.values()) if has_masks else ()
    box_classes = mask_classes if "boxes" in meta else ()

    def loader(i: int) -> Callable[[], Sample]:
        def load() -> Sample:
            members = reader.members(index, i)
            meta = json.loads(members["json"])
            image = Image.open(io.BytesIO(members[image_members(members)[0]])).convert("L")
            labels = meta.get("labels", {})
            sample = Sample(
                index.key(i),
                image,
                np.array([labels.get(c, np.nan) for c in classes], dtype=np.float32),
                text=" ".join(meta.get("sentences", [])),
            )
            if has_masks:
                bits = np.asarray(Image.open(io.BytesIO(members["mask.png"])))
                sample.masks = np.stack([(bits >> b) & 1 for b in range(len(mask_classes))]).astype(
                    bool
                )
            if box_classes:
                boxes = meta.get("boxes", [])
                sample.boxes = np.array([b["box"] for b in boxes], dtype=np.float32).reshape(-1, 4)
                sample.box_labels = np.array(
                    [box_classes.index(b["label"]) for b in boxes], dtype=np.int64
                )
            return sample

        return load

    keys = [index.key(i) for i in range(len(index))]
    records = [Record(key, key, loader(i)) for i, key in enumerate(keys)]
    return DownstreamSet(
        f"shards:{directory}",
        split,
        classes,
        records,
        mask_classes=mask_classes,
        box_classes=box_classes,
    )


# --- CheXpert ----------------------------------------------------------------------------------


def _chexpert_value(raw: str, policy: UncertainPolicy) -> float:
    value = chexpert_value(raw, policy)
    return 0.0 if value is None else value  # blank: not mentioned, a negative in CheXpert


def _chexpert_set(
    root: str,
    split: str,
    uncertain: UncertainPolicy = "ignore",
    frontal_only: bool = True,
    classes=CHEXPERT_COMPETITION,
) -> DownstreamSet:
    if uncertain not in ("ignore", "ones", "zeros"):
        raise ValueError(f"uncertain={uncertain!r}: choose ignore, ones or zeros")
    base = Path(root)
    rows = _read_csv(
        base / ("valid.csv" if split == "test" else "train.csv"), ("Path",) + tuple(classes)
    )
    records = []
    for line, row in enumerate(rows, start=2):
        if frontal_only and row.get("Frontal/Lateral", "Frontal") != "Frontal":
            continue
        rel = row["Path"]
        # Paths start with the dataset folder name (CheXpert-v1.0-small/train/...).
        parts = Path(rel).parts
        path = base.joinpath(*parts[1:]) if parts and parts[0] == base.name else base / rel
        match = re.search(r"(patient\d+)", rel)
        subject = match.group(1) if match else rel
        try:  # every row is checked, whichever split it falls in
            labels = np.array(
                [_chexpert_value(row[c], uncertain) for c in classes], dtype=np.float32
            )
        except ValueError as exc:
            raise ValueError(f"{base}: line {line} ({rel}): {exc}") from None
        if split != "test" and hashed_split(subject, "chexpert") != split:
            continue
        records.append(Record(rel, subject, _image_loader(path, rel, labels)))
    return DownstreamSet(f"chexpert:{root}", split, tuple(classes), records)


def _image_loader(path: Path, key: str, labels: np.ndarray, **extra) -> Callable[[], Sample]:
    return lambda: Sample(key, _decode(path), labels, **extra)


def _chexpert5x200_set(file: str, split: str) -> DownstreamSet:
    path = Path(file)
    spec = json.loads(_require(path, "5x200 JSON").read_text())
    if isinstance(spec, dict) and "images" in spec:
        items = [(e["path"], e["label"]) for e in spec["images"]]
        classes = tuple(spec.get("classes") or sorted({label for _, label in items}))
    elif isinstance(spec, dict):
        classes = tuple(spec)
        items = [(p, c) for c in classes for p in spec[c]]
    else:
        raise ValueError(f"{path}: expected {{'classes', 'images'}} or {{class: [paths]}}")
    unknown = sorted({label for _, label in items} - set(classes))
    if unknown:
        raise ValueError(f"{path}: labels {unknown} are not among classes {list(classes)}")
    records = []
    if split == "test":
        for rel, label in items:
            labels = _onehot(classes.index(label), len(classes))
            records.append(Record(rel, rel, _image_loader(path.parent / rel, rel, labels)))
    return DownstreamSet(f"chexpert5x200:{file}", split, classes, records, exclusive=True)


# --- RSNA Pneumonia ------------------------------------------------------------------------------


def _find_image(root: Path, folder: str, stem: str) -> Path:
    for suffix in (".dcm", ".png", ".jpg"):
        candidate = root / folder / f"{stem}{suffix}"
        if candidate.exists():
            return candidate
    return root / folder / f"{stem}.dcm"


def _rsna_set(root: str, split: str) -> DownstreamSet:
    base = Path(root)
    rows = _read_csv(
        base / "stage_2_train_labels.csv", ("patientId", "x", "y", "width", "height", "Target")
    )
    boxes: dict[str, list] = {}
    for row in rows:
        patient = row["patientId"]
        boxes.setdefault(patient, [])
        if row["Target"].strip() == "1":
            x, y, w, h = (float(row[k]) for k in ("x", "y", "width", "height"))
            boxes[patient].append([x, y, x + w, y + h])
    records = []
    for patient, found in boxes.items():
        if hashed_split(patient, "rsna") != split:
            continue

        def load(patient=patient, found=found) -> Sample:
            image = _decode(_find_image(base, "stage_2_train_images", patient))
            # Segmentation target: the boxes filled in (the usual RSNA region protocol).
            mask = np.zeros((image.height, image.width), dtype=bool)
            for x0, y0, x1, y1 in found:
                mask[max(0, round(y0)) : round(y1), max(0, round(x0)) : round(x1)] = True
            return Sample(
                patient,
                image,
                _onehot(int(bool(found)), 2),
                masks=mask[None],
                boxes=np.array(found, dtype=np.float32).reshape(-1, 4),
                box_labels=np.zeros(len(found), dtype=np.int64),
            )

        records.append(Record(patient, patient, load))
    return DownstreamSet(
        f"rsna:{root}",
        split,
        ("No Pneumonia", "Pneumonia"),
        records,
        exclusive=True,
        mask_classes=("Pneumonia",),
        box_classes=("Pneumonia",),
    )


# --- SIIM-ACR ----------------------------------------------------------------------------------


def rle_decode(code: str, height: int, width: int, relative: bool = True) -> np.ndarray:
    """SIIM run-length code to a bool mask. Pixels are numbered down each column, then across
    (column-major). `relative`: each start counts from the end of the previous run (the
    competition's `train-rle.csv`); otherwise starts are absolute and 1-based."""
    flat = np.zeros(height * width, dtype=bool)
    code = code.strip()
    if code in ("", "-1"):
        return flat.reshape(width, height).T
    values = [int(v) for v in code.split()]
    if len(values) % 2:
        raise ValueError(f"run-length code has an odd count of numbers ({len(values)})")
    position = 0
    for start, length in zip(values[0::2], values[1::2]):
        position = position + start if relative else start - 1
        if position < 0 or length < 0 or position + length > flat.size:
            raise ValueError(f"run ({start}, {length}) leaves the {height}x{width} image")
        flat[position : position + length] = True
        position += length
    return flat.reshape(width, height).T


def rle_encode(mask: np.ndarray, relative: bool = True) -> str:
    """The inverse of `rle_decode` (`-1` for an empty mask)."""
    flat = np.concatenate([[False], mask.T.reshape(-1), [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])
    starts, ends = edges[0::2], edges[1::2]
    if not len(starts):
        return "-1"
    out, previous = [], 0
    for s, e in zip(starts, ends):
        out += [int(s - previous) if relative else int(s + 1), int(e - s)]
        previous = e
    return " ".join(map(str, out))


def _siim_set(root: str, split: str, relative: bool = True) -> DownstreamSet:
    base = Path(root)
    rows = _read_csv(base / "train-rle.csv", ("ImageId", "EncodedPixels"))
    codes: dict[str, list[str]] = {}
    for row in rows:
        codes.setdefault(row["ImageId"].strip(), []).append(row["EncodedPixels"])
    files = {p.stem: p for p in base.rglob("*") if p.suffix.lower() in (".dcm", ".png")}
    records = []
    for image_id, image_codes in codes.items():
        if hashed_split(image_id, "siim") != split:
            continue
        path = files.get(image_id, base / f"{image_id}.dcm")
        positive = any(c.strip() not in ("", "-1") for c in image_codes)

        def load(path=path, image_id=image_id, image_codes=image_codes, positive=positive):
            image = _decode(path)
            try:
                mask = np.zeros((image.height, image.width), dtype=bool)
                for code in image_codes:
                    mask |= rle_decode(code, image.height, image.width, relative)
            except ValueError as exc:
                raise ImageDecodeError(f"{image_id}: mask: {exc}") from None
            return Sample(image_id, image, _onehot(int(positive), 2), masks=mask[None])

        records.append(Record(image_id, image_id, load))
    return DownstreamSet(
        f"siim:{root}",
        split,
        ("No Pneumothorax", "Pneumothorax"),
        records,
        exclusive=True,
        mask_classes=("Pneumothorax",),
    )


# --- COVIDx ----------------------------------------------------------------------------------

_COVIDX_ORDER = ("negative", "positive", "normal", "pneumonia", "COVID-19")


def _covidx_set(root: str, split: str) -> DownstreamSet:
    base = Path(root)
    name = "test" if split == "test" else "train"
    lines = _require(base / f"{name}.txt", "label file").read_text().splitlines()
    entries = []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 3:
            raise ValueError(
                f"{base / f'{name}.txt'}: line {number}: expected 'patient file "
                f"label [source]', got {line!r}"
            )
        entries.append((fields[0], fields[1], fields[2]))
    found = {label for _, _, label in entries}
    classes = tuple(c for c in _COVIDX_ORDER if c in found) + tuple(
        sorted(found - set(_COVIDX_ORDER))
    )
    records = []
    for patient, filename, label in entries:
        if split != "test" and hashed_split(patient, "covidx") != split:
            continue
        labels = _onehot(classes.index(label), len(classes))
        records.append(
            Record(filename, patient, _image_loader(base / name / filename, filename, labels))
        )
    return DownstreamSet(f"covidx:{root}", split, classes, records, exclusive=True)


ADAPTERS = {
    "chexpert": _chexpert_set,
    "chexpert5x200": _chexpert5x200_set,
    "rsna": _rsna_set,
    "siim": _siim_set,
    "covidx": _covidx_set,
}


def open_dataset(spec: str, split: str, split_file: str | None = None, **options) -> DownstreamSet:
    """`DIR` (shards) or `KIND:PATH`; `options` go to the adapter (e.g. `uncertain="ones"`)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: choose one of {SPLITS}")
    kind, sep, path = spec.partition(":")
    if sep and kind in ADAPTERS:
        if split_file is None:
            dataset = ADAPTERS[kind](path, split, **options)
        else:
            dataset = _from_split_file(ADAPTERS[kind], path, split, split_file, options)
    elif sep and not Path(spec).exists() and re.fullmatch(r"[a-z0-9]+", kind):
        raise ValueError(
            f"--data {spec!r}: unknown dataset kind {kind!r}; choose a shard "
            f"directory or one of {sorted(ADAPTERS)}"
        )
    else:
        if options or split_file:
            raise ValueError(
                "--split-file and adapter options apply to KIND:PATH data; shards "
                "carry their own splits"
            )
        dataset = _shard_set(spec, split)
    if not dataset.records:
        raise ValueError(f"{spec} [{split}]: no samples")
    return dataset


def _from_split_file(adapter, path: str, split: str, split_file: str, options) -> DownstreamSet:
    chosen = json.loads(_require(Path(split_file), "split file").read_text())
    if split not in chosen:
        raise ValueError(f"{split_file}: no {split!r} list; it has {sorted(chosen)}")
    wanted = set(chosen[split])
    parts = [adapter(path, name, **options) for name in SPLITS]
    merged = parts[0]
    merged.records = [r for part in parts for r in part.records if r.key in wanted]
    merged.split = split
    return merged


def write_split_file(spec: str, out: str, **options) -> dict:
    """Every split's keys (what `--split-file` reads), so a split can be pinned and committed."""
    lists = {}
    for split in SPLITS:
        try:
            lists[split] = open_dataset(spec, split, **options).keys
        except ValueError:
            lists[split] = []
    Path(out).write_text(json.dumps(lists, indent=1))
    return {k: len(v) for k, v in lists.items()}
