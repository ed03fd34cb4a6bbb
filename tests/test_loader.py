import json
import socket
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch

from prior_dist.data.config import DataConfig, default_workers
from prior_dist.data.loader import BatchPlan, PriorLoader
from prior_dist.data.shards import load_index, load_manifest
from prior_dist.data.transforms import TransformConfig, swap_laterality
from tests.conftest import REPO

CFG = TransformConfig(image_size=32)


def all_keys(directory, split="train"):
    manifest = load_manifest(directory)
    return sorted(
        s["key"]
        for shard in manifest["splits"][split]["shards"]
        for s in load_index(directory, shard["name"])["samples"]
    )


def make(directory, tokenizer, batch, rank=0, world=1, **kw):
    kw.setdefault("transform", CFG)
    return PriorLoader(directory, tokenizer, batch, rank=rank, world_size=world, seed=7, **kw)


def epoch_batches(loaders):
    return [list(loader) for loader in loaders]


@pytest.mark.parametrize("world,batch", [(1, 5), (2, 4), (3, 3), (4, 16)])
def test_exactly_once_and_equal_counts(phantom_dir, tokenizer, world, batch):
    loaders = [make(phantom_dir, tokenizer, batch, r, world) for r in range(world)]
    per_rank = epoch_batches(loaders)
    assert len({len(b) for b in per_rank}) == 1 and len(per_rank[0]) == len(loaders[0])
    served = [k for batches in per_rank for b in batches for k in b["key"]]
    assert sorted(served) == all_keys(phantom_dir)  # every sample once, none twice


def test_batches_independent_of_world_size_and_workers(phantom_dir, tokenizer):
    single = list(make(phantom_dir, tokenizer, 6))
    pair = epoch_batches([make(phantom_dir, tokenizer, 3, r, 2, num_workers=2) for r in range(2)])
    assert len(single) == len(pair[0]) == len(pair[1])
    for step, whole in enumerate(single):
        parts = [pair[0][step], pair[1][step]]
        assert whole["key"] == parts[0]["key"] + parts[1]["key"]
        assert torch.equal(whole["image"], torch.cat([p["image"] for p in parts]))
        for row, key in enumerate(whole["key"]):
            part = parts[0] if key in parts[0]["key"] else parts[1]
            prow = part["key"].index(key)
            n = int(whole["attention_mask"][row].sum())
            assert torch.equal(whole["input_ids"][row, :n], part["input_ids"][prow, :n])
            assert torch.equal(whole["sentence_index"][row, :n], part["sentence_index"][prow, :n])


def test_epochs_reshuffle_and_are_reproducible(phantom_dir, tokenizer):
    loader = make(phantom_dir, tokenizer, 4)
    first = [k for b in loader for k in b["key"]]
    second = [k for b in loader for k in b["key"]]  # iterating again moves to epoch 1
    assert loader.epoch == 1 and sorted(first) == sorted(second) and first != second
    again = make(phantom_dir, tokenizer, 4)
    assert [k for b in again for k in b["key"]] == first


def test_mid_epoch_resume_with_workers(phantom_dir, tokenizer):
    reference = make(phantom_dir, tokenizer, 4, num_workers=2)
    expected = list(reference) + list(reference)  # two epochs
    loader = make(phantom_dir, tokenizer, 4, num_workers=2)
    seen = []
    for batch in loader:
        seen.append(batch)
        if len(seen) == 3:
            break
    state = json.loads(json.dumps(loader.state_dict()))  # must survive a JSON checkpoint
    resumed = make(phantom_dir, tokenizer, 4, num_workers=2)
    resumed.load_state_dict(state)
    resumed.set_epoch(0)  # a training loop's set_epoch must not rewind a resumed position
    seen += list(resumed) + list(resumed)
    assert [b["key"] for b in seen] == [b["key"] for b in expected]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(seen, expected, strict=True))


def test_workers_are_kept_across_epochs_and_resume_stays_exact(phantom_dir, tokenizer):
    """Indexed-mode workers live from one epoch to the next (no re-fork stall) and serve what a
    worker-less loader serves; a resume into the second epoch, and an iteration abandoned
    mid-epoch, change nothing."""
    expected = [b["key"] for b in _epochs(make(phantom_dir, tokenizer, 4), 3)]
    loader = make(phantom_dir, tokenizer, 4, num_workers=2)
    seen, pids = [], []
    for _ in range(2):
        seen += [b["key"] for b in loader]
        pids.append(sorted(w.pid for w in loader._dataloader._iterator._workers))
    assert pids[0] == pids[1]  # the same processes served both epochs
    batches = iter(loader)
    seen.append(next(batches)["key"])  # abandoned with prefetched batches in flight
    state = loader.state_dict()
    seen += [b["key"] for b in loader]  # the rest of epoch 2 from where it stood
    assert seen == expected
    workers = loader._dataloader._iterator._workers
    loader.close()
    assert not any(w.is_alive() for w in workers)
    resumed = make(phantom_dir, tokenizer, 4, num_workers=2)
    resumed.load_state_dict(state)
    position = state["epoch"] * len(loader) + state["batch"]
    assert [b["key"] for b in resumed] == expected[position:]
    resumed.close()


def _epochs(loader, count):
    return [b for _ in range(count) for b in loader]


def test_default_worker_count_leaves_a_core_to_the_rank():
    assert default_workers(usable=16, node=16, local_ranks=1) == 8  # capped
    assert default_workers(usable=16, node=16, local_ranks=2) == 7  # shared among the ranks
    assert default_workers(usable=4, node=64, local_ranks=8) == 3  # bound by the launcher
    assert default_workers(usable=2, node=2, local_ranks=2) == 0  # the rank thread's core only
    assert DataConfig(workers=3).worker_count() == 3


def test_resume_on_another_world_size_with_same_global_batch(phantom_dir, tokenizer):
    one = make(phantom_dir, tokenizer, 4)
    it = iter(one)
    next(it), next(it)
    state = one.state_dict()
    rest_single = [b["key"] for b in it]
    ranks = [make(phantom_dir, tokenizer, 2, r, 2) for r in range(2)]
    for loader in ranks:
        loader.load_state_dict(state)
    rest_pair = epoch_batches(ranks)
    assert rest_single == [a["key"] + b["key"] for a, b in zip(*rest_pair, strict=True)]


def test_resume_with_another_global_batch_continues_from_the_same_sample(phantom_dir, tokenizer):
    """8 samples served in batches of 4; batches of 3 go on from sample 6 (2 served again);
    with whole steps of 4 batches from sample 0; a finished epoch stays finished."""
    order = [k for b in make(phantom_dir, tokenizer, 4) for k in b["key"]]
    one = make(phantom_dir, tokenizer, 4)
    it = iter(one)
    next(it), next(it)
    state = one.state_dict()
    three = make(phantom_dir, tokenizer, 3)
    assert three.load_state_dict(state) == 2
    assert [k for b in three for k in b["key"]] == order[6:]
    assert make(phantom_dir, tokenizer, 3).load_state_dict(state, batches_per_step=4) == 8
    list(it)
    finished = make(phantom_dir, tokenizer, 3)
    assert finished.load_state_dict(one.state_dict()) == 0
    assert [b["epoch"] for b in finished][:1] == [1]


def test_last_batch_rules():
    plan = BatchPlan(10, 3, 2, "uneven")
    assert plan.num_batches == 2
    assert [plan.rank_slice(1, r) for r in range(2)] == [(6, 8), (8, 10)]
    tiny = BatchPlan(7, 3, 2, "uneven")
    assert [tiny.rank_slice(1, r) for r in range(2)] == [(6, 6), (6, 7)]  # a rank may get none
    assert BatchPlan(10, 3, 2, "drop").num_batches == 1
    with pytest.raises(ValueError, match="last_batch"):
        BatchPlan(10, 3, 2, "pad")


def test_drop_mode_serves_whole_batches(phantom_dir, tokenizer):
    loaders = [make(phantom_dir, tokenizer, 4, r, 2, last_batch="drop") for r in range(2)]
    for batches in epoch_batches(loaders):
        assert all(len(b["key"]) == 4 for b in batches)


def _corrupt_image_member(directory, shard_name, position):
    entry = load_index(directory, shard_name)["samples"][position]
    offset, _ = entry["members"]["jpg"] if "jpg" in entry["members"] else entry["members"]["0.jpg"]
    with open(directory / f"{shard_name}.tar", "r+b") as handle:
        handle.seek(offset)
        handle.write(b"\0" * 64)
    return entry["key"]


@pytest.mark.parametrize("mode", ["indexed", "stream"])
def test_corrupt_and_truncated_samples_are_skipped_and_counted(phantom_copy, tokenizer, mode):
    bad_key = _corrupt_image_member(phantom_copy, "train-000000", 2)
    shard = phantom_copy / "train-000003.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    loaders = [
        make(phantom_copy, tokenizer, 3, r, 2, mode=mode, num_workers=2 if mode == "stream" else 0)
        for r in range(2)
    ]
    per_rank = epoch_batches(loaders)
    assert len(per_rank[0]) == len(per_rank[1]) == len(loaders[0])
    served = [k for batches in per_rank for b in batches for k in b["key"]]
    skipped = sum(loader.skipped["corrupt_sample"] for loader in loaders)
    assert bad_key not in served and len(set(served)) == len(served)
    assert 2 <= skipped and len(served) + skipped == len(all_keys(phantom_copy))


def test_stream_mode_exactly_once_and_resume(phantom_dir, tokenizer):
    def stream(r, world=2):
        return make(phantom_dir, tokenizer, 3, r, world, mode="stream", num_workers=2)

    per_rank = epoch_batches([stream(r) for r in range(2)])
    assert len(per_rank[0]) == len(per_rank[1])
    served = [k for batches in per_rank for b in batches for k in b["key"]]
    assert sorted(served) == all_keys(phantom_dir)
    loader = stream(1)
    head = []
    for batch in loader:
        head.append(batch["key"])
        if len(head) == 4:
            break
    resumed = stream(1)
    resumed.load_state_dict(loader.state_dict())
    assert head + [b["key"] for b in resumed] == [b["key"] for b in per_rank[1]]


def test_resampled_mode_and_weighted_mixture(phantom_dir, tokenizer, tmp_path):
    loader = make(phantom_dir, tokenizer, 4, mode="resampled", samples_per_epoch=20)
    keys = [k for b in loader for k in b["key"]]
    assert len(keys) == 20 and set(keys) <= set(all_keys(phantom_dir))
    from prior_dist.preparation.build import build_shards
    from prior_dist.preparation.sources import enumerate_phantom
    from prior_dist.preparation.study import PrepareSettings

    other = tmp_path / "other"
    records, skipped, source = enumerate_phantom(30, seed=9)
    build_shards(
        records,
        skipped,
        source,
        PrepareSettings(image_size=48, phantom_seed=9),
        other,
        shard_size=8,
        progress=False,
    )
    mixed = PriorLoader(
        [str(phantom_dir), f"{other}:2"], tokenizer, 5, seed=1, transform=CFG, rank=0, world_size=1
    )
    keys = [k for b in mixed for k in b["key"]]
    n_other = len(all_keys(other))
    assert len(keys) == len(all_keys(phantom_dir)) + 2 * n_other
    assert sum(k.startswith("ph0009") for k in keys) == 2 * n_other


def test_flip_swaps_laterality_and_mirrors_image(phantom_dir, tokenizer):
    plain = TransformConfig(image_size=32, rotation_degrees=0, shuffle_sentences=False)
    flipped = TransformConfig(
        image_size=32, rotation_degrees=0, shuffle_sentences=False, flip_probability=1.0
    )
    a = next(iter(make(phantom_dir, tokenizer, 8, transform=plain)))
    b = next(iter(make(phantom_dir, tokenizer, 8, transform=flipped)))
    assert a["key"] == b["key"] and bool(b["flipped"].all()) and not a["flipped"].any()
    assert torch.equal(torch.flip(a["image"], dims=[-1]), b["image"])
    assert b["sentences"] == [[swap_laterality(s) for s in sents] for sents in a["sentences"]]
    assert (
        swap_laterality("Left effusion, RIGHT lung, left-sided.")
        == "Right effusion, LEFT lung, right-sided."
    )


def test_batch_contract_and_labels(phantom_dir, tokenizer):
    loader = make(phantom_dir, tokenizer, 4, label_names=["Edema", "Cardiomegaly", "Missing"])
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 1, 32, 32) and batch["image"].dtype == torch.float32
    length = int(batch["attention_mask"].sum(1).max())
    assert batch["input_ids"].shape[1] == length  # padded to the batch's own longest report
    assert (batch["sentence_index"][batch["attention_mask"] == 0] == -1).all()
    assert (batch["sentence_index"][:, 0] == -1).all()  # [CLS]
    assert batch["labels"].shape == (4, 3) and torch.isnan(batch["labels"][:, 2]).all()
    assert [len(s) for s in batch["sentences"]] == batch["num_sentences"].tolist()


def test_truncation_keeps_sep_and_drops_empty_sentences(tokenizer):
    from prior_dist.data.tokenize import tokenize_sentences

    ids, index = tokenize_sentences(
        tokenizer, ["no pleural effusion .", "heart normal .", "lungs clear ."], 8
    )
    assert len(ids) == 8 and ids[-1] == tokenizer.sep_token_id and ids[0] == tokenizer.cls_token_id
    assert index == [-1, 0, 0, 0, 0, 1, 1, -1]  # third sentence lost every token: dropped
    with pytest.raises(ValueError):
        tokenize_sentences(tokenizer, ["x"], 2)


def test_bad_configuration_is_named(phantom_dir, tokenizer):
    with pytest.raises(ValueError, match="rank"):
        make(phantom_dir, tokenizer, 4, rank=2, world=2)
    with pytest.raises(ValueError, match="split"):
        make(phantom_dir, tokenizer, 4, split="nope")
    with pytest.raises(ValueError, match="flip_probability"):
        TransformConfig(flip_probability=2)
    with pytest.raises(FileNotFoundError, match="manifest"):
        make(phantom_dir / "missing", tokenizer, 4)
    with pytest.raises(ValueError, match="stream"):
        PriorLoader("pipe:cat x", tokenizer, 4, mode="indexed")


def test_stream_cli_reports_exactly_once(phantom_dir):
    from conftest import run_cli

    proc = run_cli(
        "prior_dist.stream",
        str(phantom_dir),
        "--batch-size",
        "8",
        "--workers",
        "1",
        "--image-size",
        "32",
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["exactly_once"] is True and report["samples"] == len(all_keys(phantom_dir))
    assert "stream:" not in proc.stderr  # stderr is a pipe here: no bar unless asked
    batches = report["batches"]
    forced = run_cli(
        "prior_dist.stream",
        str(phantom_dir),
        "--batch-size",
        "8",
        "--image-size",
        "32",
        "--max-steps",
        "3",
        env={"PRIOR_PROGRESS": "1"},
    )
    assert "stream: 100%" in forced.stderr and "3/3" in forced.stderr, forced.stderr
    assert batches > 3
    proc = run_cli("prior_dist.stream", str(phantom_dir / "nowhere"), check=False)
    assert proc.returncode == 2 and "manifest" in proc.stderr


def test_fused_squash_rotate_matches_two_step():
    from PIL import Image

    from prior_dist.data.transforms import squash_rotate
    from prior_dist.preparation.phantom import make_study

    image = Image.fromarray(make_study(1, seed=2, size=160).images[0]).resize((160, 200))
    for angle in (0.0, 4.5, -3.0):
        two_step = image.resize((128, 128), Image.Resampling.BILINEAR).rotate(
            angle, resample=Image.Resampling.BILINEAR, fillcolor=0
        )
        fused = squash_rotate(image, 128, angle)

        def error(im, two_step=two_step):
            difference = np.asarray(im, dtype=float) - np.asarray(two_step, dtype=float)
            return np.abs(difference)[8:-8, 8:-8].mean()

        # One interpolation instead of two: close, not equal; the wrong direction is far off.
        assert fused.size == (128, 128) and error(fused) < 2.5, (angle, error(fused))
        if angle:
            assert error(squash_rotate(image, 128, -angle)) > 4 * error(fused)


def test_token_cache_gives_identical_ids(tokenizer):
    from prior_dist.data.tokenize import tokenize_sentences

    sentences = [
        "No pneumothorax.",
        "There is a small left pleural effusion.",
        "No pneumothorax.",
        "Heart normal.",
    ]
    cache = {}
    for budget in (256, 9):
        assert tokenize_sentences(tokenizer, sentences, budget, cache) == tokenize_sentences(
            tokenizer, sentences, budget
        )
    assert len(cache) == 3


def test_pipe_source_streams_exactly_once(phantom_dir, tokenizer):
    from prior_dist.data.index import ShardSource

    source = ShardSource(location=f"pipe:cat {phantom_dir}", manifest_dir=str(phantom_dir))
    loaders = [
        PriorLoader(source, tokenizer, 4, rank=r, world_size=2, seed=7, transform=CFG)
        for r in range(2)
    ]
    assert loaders[0].mode == "stream"
    per_rank = epoch_batches(loaders)
    assert len(per_rank[0]) == len(per_rank[1])
    assert sorted(k for batches in per_rank for b in batches for k in b["key"]) == all_keys(
        phantom_dir
    )


@pytest.mark.parametrize(
    "meta, message",
    [
        ([1, 2, 3], "metadata must be a JSON object"),
        ({"sentences": "Heart normal."}, "sentences must be a list of text"),
        ({"sentences": ["a", 3]}, "sentences must be a list of text"),
        ({"sentences": ["a"], "labels": {"Edema": "yes"}}, "labels must map names"),
        ({"sentences": ["a"], "labels": [1, 2]}, "labels must map names"),
    ],
)
def test_sample_json_of_the_wrong_type_is_a_corrupt_sample(meta, message):
    """Well-formed JSON of the wrong shape is skipped and counted like a broken image, never
    split into characters or crashing a worker."""
    from prior_dist.data.transforms import CorruptSample, SampleTransform, TransformConfig

    class Tokenizer:  # nothing is tokenised: the check comes first
        pad_token_id = 0

    transform = SampleTransform(Tokenizer(), TransformConfig(image_size=32), seed=0)
    members = {"json": json.dumps(meta).encode(), "jpg": b"unused"}
    with pytest.raises(CorruptSample, match=message):
        transform("k", members, epoch=0)


WORKER_SIGNALS = """
import subprocess, sys
import psutil
from prior_dist.data.loader import PriorLoader
from prior_dist.data.tokenize import load_tokenizer
from prior_dist.data.transforms import TransformConfig

shards = sys.argv[1]
loader = PriorLoader(
    shards, load_tokenizer(shards + "/wordpiece"), 4, num_workers=2,
    transform=TransformConfig(image_size=32),
)
batches = iter(loader)
next(batches)
workers = psutil.Process().children()
assert len(workers) == 2, workers
# A SIGTERM from another process (a group signal's sender): the workers stay.
subprocess.run(["kill", "-TERM", *[str(w.pid) for w in workers]], check=True)
next(batches)
next(batches)
assert all(w.is_running() for w in workers), "a worker died of someone else's SIGTERM"
print("workers kept", flush=True)
# Exit with the iterator half read: multiprocessing ends the workers with the main process's
# own SIGTERM, which they obey; the exit must not hang.
sys.exit(3)
"""


def test_workers_ignore_sigterm_from_others_but_not_from_their_rank(phantom_dir, tokenizer):
    proc = subprocess.run(
        [sys.executable, "-c", WORKER_SIGNALS, str(phantom_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,  # an overall bound: a hung exit fails here
    )
    assert "workers kept" in proc.stdout, proc.stderr[-3000:]
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "exited unexpectedly" not in proc.stderr


SIGNAL_STORM = """
import os, signal, subprocess, sys
from prior_dist.data.loader import PriorLoader
from prior_dist.data.tokenize import load_tokenizer
from prior_dist.data.transforms import TransformConfig

shards = sys.argv[1]
signal.signal(signal.SIGTERM, lambda *_: None)  # the main process rides the storm out
loader = PriorLoader(
    shards, load_tokenizer(shards + "/wordpiece"), 4, num_workers=2,
    transform=TransformConfig(image_size=32), persistent_workers=False,
)
group = os.getpgid(0)
killer = subprocess.Popen(
    ["sh", "-c", f"trap '' TERM; while :; do kill -TERM -{group} 2>/dev/null; sleep 0.001; done"],
    start_new_session=True,
)
try:
    for _ in range(12):  # every new iterator forks two workers into the storm
        batches = iter(loader)
        next(batches)
        del batches
finally:
    killer.kill()
print("no worker died", flush=True)
"""


def test_workers_forked_during_a_group_sigterm_storm_survive(phantom_dir, tokenizer):
    """Group SIGTERMs every millisecond while loaders fork their workers: a worker hit between
    its fork and its signal set-up would die ('exited unexpectedly'); none may."""
    proc = subprocess.run(
        [sys.executable, "-c", SIGNAL_STORM, str(phantom_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        start_new_session=True,  # its own process group: the storm reaches nothing else
    )
    assert "no worker died" in proc.stdout, proc.stderr[-3000:]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def s3_bucket(phantom_dir, monkeypatch):
    """The phantom shards in bucket `cxr` under `phantom/` of a local S3 server (moto): yields
    its endpoint; fsspec/s3fs reach it through AWS_ENDPOINT_URL."""
    boto3 = pytest.importorskip("boto3")
    s3fs = pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec keeps one per arguments, endpoint unseen
    port = free_port()
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for name, value in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }.items():
            monkeypatch.setenv(name, value)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="cxr")
        for path in phantom_dir.iterdir():
            if path.is_file():
                s3.upload_file(str(path), "cxr", f"phantom/{path.name}")
        yield port
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()


def through_proxy(monkeypatch, proxy: "DroppingProxy") -> None:
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    s3fs.S3FileSystem.clear_instance_cache()


def test_s3_source_streams_exactly_once_from_an_s3_server(phantom_dir, tokenizer, s3_bucket):
    """Shards, manifest and indices in a bucket of a local S3-compatible server (moto), read
    through fsspec/s3fs: every sample once over two ranks, as from the local directory."""
    loaders = [
        PriorLoader("s3://cxr/phantom", tokenizer, 4, rank=r, world_size=2, seed=7, transform=CFG)
        for r in range(2)
    ]
    assert loaders[0].mode == "stream"
    per_rank = epoch_batches(loaders)
    keys = sorted(k for batches in per_rank for b in batches for k in b["key"])
    assert keys == all_keys(phantom_dir)
    assert sum(loader.io_retries for loader in loaders) == 0
    with pytest.raises(FileNotFoundError, match="s3://cxr/nothing/manifest.json"):
        PriorLoader("s3://cxr/nothing", tokenizer, 4, transform=CFG)


class DroppingProxy:
    """A TCP proxy in front of the S3 server. The first `drops` GET requests whose path holds
    `target` get the first `cut_after` bytes of their response, then the connection is closed:
    a connection dropped mid-shard. Every request is sent upstream with `Connection: close`."""

    def __init__(self, upstream: int, target: str, drops: int, cut_after: int):
        self.upstream, self.target, self.cut_after = upstream, target, cut_after
        self.drops_left, self.dropped = drops, 0
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", self.upstream)) as upstream:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    return
                head += chunk
            head, _, body = head.partition(b"\r\n\r\n")
            lines = [x for x in head.split(b"\r\n") if not x.lower().startswith(b"connection:")]
            upstream.sendall(b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n" + body)
            request = lines[0].decode()
            with self.lock:
                drop = request.startswith("GET") and self.target in request and self.drops_left
                if drop:
                    self.drops_left -= 1
                    self.dropped += 1
            sent = 0
            while chunk := upstream.recv(65536):
                if drop and sent + len(chunk) >= self.cut_after:
                    client.sendall(chunk[: self.cut_after - sent])
                    return
                client.sendall(chunk)
                sent += len(chunk)

    def close(self) -> None:
        self.server.close()


def read_through_proxy(tokenizer, monkeypatch, upstream, shard, drops, **options):
    """One epoch of the S3 phantom data set, read through a proxy that cuts the first `drops`
    transfers of `shard` halfway: (the proxy, the loader, the keys served)."""
    proxy = DroppingProxy(upstream, f"phantom/{shard['file']}", drops, shard["size_bytes"] // 2)
    through_proxy(monkeypatch, proxy)
    try:
        loader = PriorLoader(
            "s3://cxr/phantom",
            tokenizer,
            4,
            seed=7,
            transform=CFG,
            rank=0,
            world_size=1,
            io_backoff_s=0.01,
            **options,
        )
        keys = [k for batch in loader for k in batch["key"]]
    finally:
        proxy.close()
    return proxy, loader, keys


@pytest.mark.parametrize("workers", [0, 2])
def test_a_connection_dropped_mid_shard_loses_and_repeats_nothing(
    phantom_dir, tokenizer, s3_bucket, monkeypatch, workers
):
    """Seven cut transfers of one shard: more than s3fs retries on its own (5), so our retry
    (resume from the byte reached, with backoff) is what saves the shard's samples."""
    shard = load_manifest(phantom_dir)["splits"]["train"]["shards"][1]
    proxy, loader, keys = read_through_proxy(
        tokenizer,
        monkeypatch,
        s3_bucket,
        shard,
        7,
        num_workers=workers,
        io_retries=3,
    )
    assert proxy.dropped == 7 and loader.io_retries >= 1
    assert sorted(keys) == all_keys(phantom_dir) and not loader.skipped
    assert loader.state_dict()["io_retries"] == loader.io_retries


def test_a_shard_that_keeps_failing_is_skipped_and_counted(
    phantom_dir, tokenizer, s3_bucket, monkeypatch
):
    """Past the retries, the shard's samples are skipped, counted and named, and every other
    sample still comes exactly once."""
    shard = load_manifest(phantom_dir)["splits"]["train"]["shards"][0]
    _, loader, keys = read_through_proxy(
        tokenizer, monkeypatch, s3_bucket, shard, 10**6, io_retries=1
    )
    lost = {s["key"] for s in load_index(phantom_dir, shard["name"])["samples"]}
    assert sorted(keys) == sorted(set(all_keys(phantom_dir)) - lost)
    assert loader.skipped["corrupt_sample"] == len(lost) == shard["num_samples"]
    assert f"{shard['file']}" in loader.skipped_examples[0]
    assert "after 1 retries" in loader.skipped_examples[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_pin_memory_is_handed_to_the_dataloader(phantom_dir, tokenizer, workers):
    """pin_memory (set by the trainer and evaluation for a CUDA consumer) reaches the
    DataLoader and changes no batch; on CUDA machines the images come back page-locked."""
    plain = make(phantom_dir, tokenizer, 8, num_workers=workers)
    pinned = make(phantom_dir, tokenizer, 8, num_workers=workers, pin_memory=True)
    assert pinned._loader_kwargs()["pin_memory"] is True
    assert plain._loader_kwargs()["pin_memory"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no accelerator" on a CPU machine
        a, b = next(iter(plain)), next(iter(pinned))
    assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
    if torch.cuda.is_available():
        assert b["image"].is_pinned()
