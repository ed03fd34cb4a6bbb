"""The consolidated split index: one memory-mapped file per split.

``{split}.index.bin`` holds, for every sample of the split in manifest order, its shard (int32),
the byte offset (int64, -1 when absent) and size (uint32) of each member type, and its key (one
UTF-8 blob with int64 start offsets). The loader maps it read-only, so every DataLoader worker
and every rank on a node shares the same pages, and opening it costs the same at 10 million
samples as at ten: nothing is parsed per sample. The per-shard ``.idx.json`` files stay the
source of truth; this file is derived from them, by `finalize` (so `shardify` writes it), by
`shardify reindex DIR`, or on first use when it is missing or stale.

Layout: the 8-byte magic, a little-endian uint64 header length, the JSON header (version, split,
member types, sample count, the digest of the split's shard list in manifest.json, each array's
dtype, shape and offset, the sha256 of the array bytes), then the arrays, each 64-byte aligned.
A header whose digest does not match the manifest is stale: the index is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prior_dist.atomic import atomic_file, file_lock
from prior_dist.data.shards import load_index

MAGIC = b"PRIORIDX"
VERSION = 1
_ALIGN = 64
_ARRAYS = ("shard", "offsets", "sizes", "key_starts", "keys")
_MAX_MEMBER = np.iinfo(np.uint32).max


def _raw(array: np.ndarray) -> np.ndarray:
    """The array's bytes, as a flat uint8 view (no copy for a contiguous array)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def compact_name(split: str) -> str:
    return f"{split}.index.bin"


def shards_digest(shards: list[dict]) -> str:
    """What the index was built from: the split's shard list in manifest.json."""
    listing = [
        [s["name"], s["file"], s["num_samples"], s.get("sha256"), s.get("size_bytes")]
        for s in shards
    ]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


@dataclass
class CompactIndex:
    """One split of one source: per-sample arrays (memory-mapped when read from disk)."""

    exts: list[str]
    shard: np.ndarray  # int32 [N]: position of the sample's shard in the manifest's list
    offsets: np.ndarray  # int64 [N, E]: byte offset of each member type, -1 when absent
    sizes: np.ndarray  # uint32 [N, E]
    key_starts: np.ndarray  # int64 [N + 1] into `keys`
    keys: np.ndarray  # uint8 blob
    digest: str = ""  # of the shard list it was built from
    checksum: str = ""  # sha256 of the array bytes, as written (empty until written)

    def __len__(self) -> int:
        return len(self.shard)

    def key(self, i: int) -> str:
        return bytes(self.keys[self.key_starts[i] : self.key_starts[i + 1]]).decode()

    def spans(self, i: int) -> dict[str, tuple[int, int]]:
        """`{extension: (offset, size)}` of sample `i`'s members."""
        offsets, sizes = self.offsets[i].tolist(), self.sizes[i].tolist()
        return {
            ext: (offset, size)
            for ext, offset, size in zip(self.exts, offsets, sizes)
            if offset >= 0
        }

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in _ARRAYS}


def build_compact(manifest_dir: str | Path, shards: list[dict]) -> CompactIndex:
    """The index of one split from its shards' `.idx.json` files (checked against the manifest's
    sample counts; a mismatch names the shard)."""
    total = sum(s["num_samples"] for s in shards)
    shard_ids = np.empty(total, dtype=np.int32)
    key_starts = np.zeros(total + 1, dtype=np.int64)
    columns: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    blob = bytearray()
    i = 0
    for shard_id, shard in enumerate(shards):
        samples = load_index(manifest_dir, shard["name"])["samples"]
        if len(samples) != shard["num_samples"]:
            raise ValueError(
                f"{manifest_dir}: shard {shard['name']} has {len(samples)} samples in its index "
                f"and {shard['num_samples']} in manifest.json (rebuild with shardify)"
            )
        shard_ids[i : i + len(samples)] = shard_id
        for entry in samples:
            for ext, (offset, size) in entry["members"].items():
                if ext not in columns:
                    columns[ext] = (np.full(total, -1, np.int64), np.zeros(total, np.uint32))
                if size > _MAX_MEMBER:
                    raise ValueError(f"{shard['name']}: {entry['key']}.{ext} is over 4 GiB")
                columns[ext][0][i], columns[ext][1][i] = offset, size
            blob += entry["key"].encode()
            i += 1
            key_starts[i] = len(blob)
    exts = sorted(columns)
    return CompactIndex(
        exts,
        shard_ids,
        np.stack([columns[e][0] for e in exts], 1) if exts else np.zeros((total, 0), np.int64),
        np.stack([columns[e][1] for e in exts], 1) if exts else np.zeros((total, 0), np.uint32),
        key_starts,
        np.frombuffer(bytes(blob), dtype=np.uint8),
        shards_digest(shards),
    )


def _layout(index: CompactIndex, split: str) -> tuple[dict, list[np.ndarray]]:
    arrays = [np.ascontiguousarray(a) for a in index.arrays().values()]
    specs, position = {}, 0
    for name, array in zip(_ARRAYS, arrays):
        position = -(-position // _ALIGN) * _ALIGN
        specs[name] = {"dtype": array.dtype.str, "shape": list(array.shape), "offset": position}
        position += array.nbytes
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(_raw(array))
    header = {
        "version": VERSION,
        "split": split,
        "num_samples": len(index),
        "exts": index.exts,
        "shards_digest": index.digest,
        "arrays": specs,
        "arrays_sha256": digest.hexdigest(),
    }
    return header, arrays


def write_compact(path: str | Path, index: CompactIndex, split: str) -> None:
    """Write atomically: a temporary file in the same directory, fsync, rename into place."""
    path = Path(path)
    header, arrays = _layout(index, split)
    text = json.dumps(header).encode()
    start = -(-(16 + len(text)) // _ALIGN) * _ALIGN
    with atomic_file(path) as handle:
        handle.write(MAGIC + struct.pack("<Q", len(text)) + text)
        for name, array in zip(_ARRAYS, arrays):
            handle.write(b"\0" * (start + header["arrays"][name]["offset"] - handle.tell()))
            handle.write(_raw(array))


def read_header(path: str | Path) -> tuple[dict, int]:
    """(header, where the arrays start); a ValueError naming the file when it is not an index."""
    with open(path, "rb") as handle:
        head = handle.read(16)
        if len(head) < 16 or head[:8] != MAGIC:
            raise ValueError(f"{path}: not a prior_dist split index (bad magic)")
        (length,) = struct.unpack("<Q", head[8:])
        if length > 1 << 26:
            raise ValueError(f"{path}: header length {length} is implausible")
        text = handle.read(length)
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: unreadable index header: {exc}") from exc
    if not isinstance(header, dict) or header.get("version") != VERSION:
        raise ValueError(f"{path}: index version {header.get('version')!r}, expected {VERSION}")
    return header, -(-(16 + length) // _ALIGN) * _ALIGN


def open_compact(path: str | Path) -> CompactIndex:
    """Map an index read-only; every array is checked to lie inside the file."""
    header, start = read_header(path)
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        buffer = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    arrays = {}
    for name in _ARRAYS:
        spec = header["arrays"][name]
        dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
        count = int(np.prod(shape)) if shape else 1
        offset = start + spec["offset"]
        if offset + count * dtype.itemsize > size:
            raise ValueError(f"{path}: truncated (array {name} runs past the end of the file)")
        arrays[name] = np.frombuffer(buffer, dtype, count, offset).reshape(shape)
    index = CompactIndex(
        header["exts"],
        digest=header["shards_digest"],
        checksum=header["arrays_sha256"],
        **arrays,
    )
    if len(index.key_starts) != len(index) + 1 or index.offsets.shape != (
        len(index),
        len(index.exts),
    ):
        raise ValueError(f"{path}: array shapes disagree with {len(index)} samples")
    return index


def check_compact(index: CompactIndex, path: str | Path) -> str | None:
    """A full check of an opened index's array bytes against its header's sha256 (`verify`)."""
    digest = hashlib.sha256()
    for array in index.arrays().values():
        digest.update(_raw(array))
    if digest.hexdigest() != index.checksum:
        return f"{path}: index contents do not match their checksum (rebuild: shardify reindex)"
    return None


def _current(path: Path, digest: str) -> tuple[CompactIndex | None, str]:
    """(the index at `path` when it matches `digest`, else None; why not)."""
    if not path.is_file():
        return None, "missing"
    try:
        index = open_compact(path)
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"unreadable ({exc})"
    if index.digest != digest:
        return None, "stale (the manifest's shard list changed)"
    return index, ""


def load_compact(manifest_dir: str | Path, split: str, shards: list[dict]) -> CompactIndex:
    """The split's index: mapped from ``{split}.index.bin`` when it matches the manifest, else
    built from the `.idx.json` files and written there (atomically, one process at a time). A
    directory that cannot be written keeps the index in memory."""
    path = Path(manifest_dir) / compact_name(split)
    digest = shards_digest(shards)
    index, problem = _current(path, digest)
    if index is not None:
        return index
    # One builder at a time: ranks that start together wait for the first one.
    with file_lock(path):
        index, problem = _current(path, digest)  # another process may have built it meanwhile
        if index is not None:
            return index
        print(
            f"[prior_dist] {path}: {problem}; building it from {len(shards)} shard indexes",
            file=sys.stderr,
        )
        index = build_compact(manifest_dir, shards)
        try:
            write_compact(path, index, split)
        except OSError as exc:
            print(
                f"[prior_dist] {path}: built in memory but could not be written ({exc}); run "
                f"`python -m prior_dist.shardify reindex {manifest_dir}` where it is writable",
                file=sys.stderr,
            )
            return index
    return open_compact(path)
