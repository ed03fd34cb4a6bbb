"""Property-based tests of every parser that reads user data: the report parser, the manifest
row reader, a sample's JSON and the shard index/tar reader. The property: the input is skipped
and counted, or refused with an error naming it; never an uncaught exception, never a hang
(pytest's timeout bounds each test). Examples are bounded and derandomized, so CI runs the same
few hundred inputs every time."""

import json
import shutil

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prior_dist.data.loader import PriorLoader
from prior_dist.data.shards import load_index, load_manifest
from prior_dist.data.transforms import CorruptSample, SampleTransform, TransformConfig
from prior_dist.preparation.reports import decode_report_bytes, extract_sections, split_sentences
from prior_dist.preparation.sources import enumerate_manifest
from tests.imaging import gradient, png_bytes

FUZZ = settings(
    max_examples=60,
    deadline=None,  # a busy machine is slow; a hang still fails on pytest's timeout
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)

# Pieces that the sentence splitter's patterns look for, glued at random.
REPORT_PIECES = st.lists(
    st.sampled_from(
        [
            "FINDINGS:",
            "IMPRESSION:",
            "FINDINGS AND IMPRESSION:",
            "Findings:",
            "HISTORY:",
            "1.",
            "2.",
            "10.",
            "Dr.",
            "1.5 cm",
            "e.g.",
            "i.e.",
            "a.m.",
            "p.m.",
            "XXXX",
            "___",
            "\n",
            "\n\n",
            "\r\n",
            ".",
            "..",
            " ",
            "\t",
            "?",
            ";",
            ",",
            "No effusion",
            "left",
            "right",
            "\u00a0",
            "\x00",
            "é",
            "😀",
        ]
    ),
    max_size=300,
).map("".join)


@FUZZ
@given(st.binary(max_size=3000) | REPORT_PIECES.map(lambda t: t.encode("utf-8")))
def test_report_parser_takes_any_bytes(data):
    text, _clean = decode_report_bytes(data)
    report = extract_sections(text)
    for sentence in report.sentences + split_sentences(text):
        assert isinstance(sentence, str) and sentence and sentence == sentence.strip()


def test_report_parser_on_long_adversarial_text_finishes():
    """Inputs that make backtracking regular expressions explode (long runs of what each
    pattern half-matches) finish: pytest's timeout is the bound."""
    for piece in ("1. ", "1.5", "XXXX ", "a.", "Dr. ", " \n", "FINDINGS: ", "e.g. ", "...."):
        text = piece * 20000
        extract_sections(text)
        split_sentences(text)


ROWS = st.fixed_dictionaries(
    {},
    optional={
        "id": JSON_VALUES,
        "image": JSON_VALUES | st.just("a.png") | st.just(["a.png", "b.png"]),
        "report": JSON_VALUES | st.text(max_size=80),
        "report_path": JSON_VALUES,
        "labels": JSON_VALUES | st.just({"Edema": 1, "Atelectasis": None}) | st.just('{"A": 1}'),
        "split": JSON_VALUES | st.sampled_from(["train", "validate", "test"]),
        "subject_id": JSON_VALUES,
        "views": JSON_VALUES,
    },
)
LINES = st.lists(
    ROWS.map(json.dumps)
    | JSON_VALUES.map(json.dumps)
    | st.text(max_size=40).filter(lambda t: "\n" not in t and "\r" not in t),
    max_size=12,
)


@FUZZ
@given(LINES, st.binary(max_size=40))
def test_manifest_rows_are_records_or_counted_skips(tmp_path, lines, raw_tail):
    path = tmp_path / "studies.jsonl"
    body = "\n".join(lines).encode("utf-8") + (b"\n" + raw_tail if raw_tail else b"")
    path.write_bytes(body)
    try:
        records, skipped, source = enumerate_manifest(str(path), 0.1, 0.1)
    except ValueError as err:  # invalid JSON or UTF-8: the file and line are named
        assert str(path) in str(err) and ":" in str(err)
        return
    assert len(records) + skipped.total() == source["rows"]
    for record in records:
        assert record.images and all(isinstance(p, str) for p in record.images)
        assert record.split in ("train", "validate", "test")
        assert record.labels is None or set(record.labels.values()) <= {1.0, 0.0, -1.0, None}


@FUZZ
@given(st.binary(max_size=200) | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
def test_sample_json_is_read_or_the_sample_is_corrupt(tokenizer, meta):
    transform = SampleTransform(tokenizer, TransformConfig(image_size=16))
    members = {"json": meta, "png": png_bytes(gradient(16, 16))}
    try:
        out = transform("key0", members, epoch=0)
    except CorruptSample as err:
        assert "key0" in str(err)
        return
    assert out["image"].shape == (1, 16, 16) and out["key"] == "key0"


@FUZZ
@given(
    st.sampled_from(["index", "tar", "manifest"]),
    st.integers(0, 10**9),
    st.binary(min_size=1, max_size=64) | JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.booleans(),
)
def test_damaged_shards_are_refused_by_name_or_skipped_and_counted(
    phantom_dir, tokenizer, tmp_path_factory, which, where, junk, truncate
):
    """One file of a real shard directory is cut short at, or overwritten from, a random
    place: loading refuses it naming the file, or the epoch runs with the bad samples counted."""
    shards = tmp_path_factory.mktemp("damaged") / "shards"
    shutil.copytree(phantom_dir, shards, ignore=shutil.ignore_patterns("wordpiece"))
    manifest = load_manifest(shards)
    first = manifest["splits"]["train"]["shards"][0]
    target = {
        "index": shards / f"{first['name']}.idx.json",
        "tar": shards / first["file"],
        "manifest": shards / "manifest.json",
    }[which]
    data = target.read_bytes()
    cut = where % (len(data) + 1)
    target.write_bytes(data[:cut] if truncate else data[:cut] + junk + data[cut + len(junk) :])
    try:
        loader = PriorLoader(shards, tokenizer, 4, transform=TransformConfig(image_size=16))
        seen = sum(len(batch["key"]) for batch in loader)
    except (ValueError, FileNotFoundError) as err:
        assert target.name in str(err), err
        return
    # Every sample of the epoch arrives or is counted (one rank, the last batch kept).
    assert seen + loader.skipped["corrupt_sample"] == len(loader.index)
    if which == "tar":
        assert len(loader.index) == manifest["splits"]["train"]["num_samples"]


def test_index_of_the_wrong_shape_names_the_entry(phantom_dir, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(phantom_dir, shards, ignore=shutil.ignore_patterns("wordpiece"))
    name = load_manifest(shards)["splits"]["train"]["shards"][0]["name"]
    path = shards / f"{name}.idx.json"
    index = json.loads(path.read_text())
    index["samples"][1]["members"]["json"] = [0, -5]
    path.write_text(json.dumps(index))
    try:
        load_index(shards, name)
    except ValueError as err:
        assert f"{path}: samples[1] is malformed" in str(err)
    else:
        raise AssertionError("a negative member size was accepted")


def test_manifest_and_index_that_disagree_on_a_count_are_refused(phantom_dir, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(phantom_dir, shards, ignore=shutil.ignore_patterns("wordpiece"))
    manifest = json.loads((shards / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["shards"][0]
    shard["num_samples"] += 3
    (shards / "manifest.json").write_text(json.dumps(manifest))
    try:
        PriorLoader(shards, None, 4)
    except ValueError as err:
        assert f"shard {shard['name']} has" in str(err) and "manifest.json" in str(err)
    else:
        raise AssertionError("a manifest count the index does not have was accepted")
