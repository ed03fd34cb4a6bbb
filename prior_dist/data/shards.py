"""The shard format: names, atomic tar writing, the member-offset index, the manifest.

A prepared dataset directory holds, per split, ``{split}-{index:06d}.tar`` shards, a sidecar
``{split}-{index:06d}.idx.json`` per shard (the byte offset and size of every member, which the
loader uses for random access), and ``manifest.json``. Only declared safe member types are
written (image bytes, JSON, text); nothing is pickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from prior_dist.atomic import atomic_file

MANIFEST = "manifest.json"
FORMAT = "prior_dist-shards"
FORMAT_VERSION = 1
SAFE_EXTENSIONS = re.compile(r"^(?:\d+\.)?(?:jpg|jpeg|png|json|txt)$|^mask\.png$")
_KEY_RE = re.compile(r"[^A-Za-z0-9_\-]")
MAX_EXAMPLES = 5


def sanitize_key(raw: str) -> str:
    """A WebDataset key: no dots (they separate key from extension), no path separators."""
    key = _KEY_RE.sub("_", str(raw).strip())
    if not key:
        raise ValueError(f"empty sample id {raw!r}")
    return key


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class SkipCounter:
    """Skipped items counted by reason, with a few example ids per reason."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, example: str, count: int = 1) -> None:
        self.counts[reason] += count
        bucket = self.examples.setdefault(reason, [])
        if len(bucket) < MAX_EXAMPLES and example not in bucket:
            bucket.append(example)

    def merge(self, other: dict[str, dict]) -> None:
        for reason, entry in other.items():
            self.counts[reason] += entry["count"]
            bucket = self.examples.setdefault(reason, [])
            for example in entry.get("examples", []):
                if len(bucket) < MAX_EXAMPLES and example not in bucket:
                    bucket.append(example)

    def to_dict(self) -> dict[str, dict]:
        return {
            reason: {"count": self.counts[reason], "examples": self.examples.get(reason, [])}
            for reason in sorted(self.counts)
        }

    def total(self) -> int:
        return sum(self.counts.values())


def write_shard(out_dir: Path, name: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> dict:
    """Write samples (key, {extension: bytes}) to ``name.tar`` atomically; return its index.

    Headers are deterministic (mtime 0, uid 0), so the same samples give the same bytes and
    the same sha256 on every machine.
    """
    tar_path = out_dir / f"{name}.tar"
    entries = []
    with atomic_file(tar_path) as raw:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in samples:
                offsets = {}
                for ext in sorted(members):
                    if not SAFE_EXTENSIONS.match(ext):
                        raise ValueError(f"refusing unsafe member type {ext!r} for sample {key}")
                    data = members[ext]
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    info.mtime = 0
                    info.mode = 0o644
                    header_at = tar.offset
                    tar.addfile(info, io.BytesIO(data))
                    header_len = len(
                        info.tobuf(tarfile.USTAR_FORMAT, tarfile.ENCODING, "surrogateescape")
                    )
                    offsets[ext] = [header_at + header_len, len(data)]
                entries.append({"key": key, "members": offsets})
    return {
        "name": name,
        "file": tar_path.name,
        "num_samples": len(entries),
        "size_bytes": tar_path.stat().st_size,
        "sha256": sha256_file(tar_path),
        "samples": entries,
    }


def index_name(name: str) -> str:
    return f"{name}.idx.json"


def index_path(out_dir: Path, name: str) -> Path:
    return out_dir / index_name(name)


def shard_complete(out_dir: Path, name: str) -> bool:
    """A shard is complete when its tar and its index (written after the tar) both exist."""
    return (out_dir / f"{name}.tar").is_file() and index_path(out_dir, name).is_file()


OBJECT_STORES = ("s3://", "gs://")


def open_object(url: str):
    """A readable binary file for an object-store URL (s3://, gs://), through fsspec: s3fs or
    gcsfs must be installed; credentials and endpoints as those libraries read them (for an
    S3-compatible server: AWS_ENDPOINT_URL, or FSSPEC_S3_ENDPOINT_URL)."""
    import fsspec  # only object-store sources need it

    return fsspec.open(url, "rb").open()


def _where(location: str | Path, name: str) -> str | Path:
    """File `name` in a local directory (a Path) or under an object-store prefix (a URL)."""
    if str(location).startswith(OBJECT_STORES):
        return f"{str(location).rstrip('/')}/{name}"
    return Path(location) / name


def _read(location: str | Path, name: str) -> tuple[str | Path, bytes]:
    """(where, bytes) of file `name`; FileNotFoundError when it is not there."""
    where = _where(location, name)
    if isinstance(where, str):
        with open_object(where) as handle:
            return where, handle.read()
    return where, where.read_bytes()


def load_manifest(directory: str | Path) -> dict:
    try:
        path, data = _read(directory, MANIFEST)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{_where(directory, MANIFEST)}: no manifest.json (run `python -m prior_dist.shardify` "
            "first, or `finalize` after an array job)"
        ) from None
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: must be a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    _check_splits(path, manifest.get("splits"))
    return manifest


def _check_splits(path: Path, splits) -> None:
    """`splits`: {name: {"shards": [{"name": str, "file": str, "num_samples": int >= 0}]}}."""
    if not isinstance(splits, dict):
        raise ValueError(f"{path}: `splits` must be an object, got {splits!r:.60}")
    for split, entry in splits.items():
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list):
            raise ValueError(f"{path}: splits.{split}.shards must be a list, got {entry!r:.60}")
        for i, shard in enumerate(shards):
            if not (
                isinstance(shard, dict)
                and isinstance(shard.get("name"), str)
                and isinstance(shard.get("file"), str)
                and _count(shard.get("num_samples"))
            ):
                raise ValueError(f"{path}: splits.{split}.shards[{i}] is malformed: {shard!r:.80}")


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def load_index(directory: str | Path, name: str) -> dict:
    """A shard's index: {"samples": [{"key": str, "members": {ext: [offset, size]}}]}, checked:
    a malformed one is a ValueError naming the file and the entry."""
    try:
        path, data = _read(directory, index_name(name))
        index = json.loads(data)
    except FileNotFoundError as exc:
        path = _where(directory, index_name(name))
        raise FileNotFoundError(f"{path}: shard index missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: shard index is not valid JSON: {exc}") from exc
    samples = index.get("samples") if isinstance(index, dict) else None
    if not isinstance(samples, list):
        raise ValueError(f"{path}: shard index must be an object with a `samples` list")
    for i, entry in enumerate(samples):
        members = entry.get("members") if isinstance(entry, dict) else None
        if not (
            isinstance(entry.get("key") if isinstance(entry, dict) else None, str)
            and isinstance(members, dict)
            and all(
                isinstance(m, list) and len(m) == 2 and all(_count(v) for v in m)
                for m in members.values()
            )
        ):
            raise ValueError(f"{path}: samples[{i}] is malformed: {entry!r:.80}")
    return index
