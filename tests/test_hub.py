"""Tokenizer and BERT weights resolve the same way: a local directory, the Hugging Face cache, or
(online) a download; offline and not cached, a message that says what to fetch and where to put
it. Each case runs in a fresh interpreter, since huggingface_hub reads HF_HOME at import."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = """
import sys
from prior_dist.data.tokenize import load_tokenizer
from prior_dist.models.state_dict import load_hf_weights
what, spec = sys.argv[1], sys.argv[2]
try:
    if what == "tokenizer":
        print("OK", len(load_tokenizer(spec)))
    else:
        print("OK", len(load_hf_weights(spec)))
except (ValueError, OSError) as err:
    print("ERROR", type(err).__name__, err)
"""


def _run(tmp_path, what: str, spec: str) -> str:
    env = dict(
        os.environ,
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(REPO),
        TRANSFORMERS_VERBOSITY="error",
    )
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, what, spec],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def test_offline_and_not_cached_says_what_to_fetch(tmp_path):
    for what, field in (("tokenizer", "data.tokenizer"), ("weights", "model.text.pretrained")):
        line = _run(tmp_path, what, "someorg/some-bert")
        assert line.startswith("ERROR PretrainedUnavailable"), line
        assert f"{field}='someorg/some-bert'" in line and "HF_HUB_OFFLINE is set" in line
        assert "hf download someorg/some-bert --local-dir DIR" in line
        assert f"--set {field}=DIR" in line


def test_a_missing_local_path_is_named(tmp_path):
    line = _run(tmp_path, "tokenizer", str(tmp_path / "no" / "such" / "dir"))
    assert line.startswith("ERROR PretrainedUnavailable") and "no such directory" in line, line


def test_a_cached_hub_id_loads_offline_as_a_local_directory_does(tmp_path, tokenizer):
    """A snapshot laid out as the Hugging Face cache keeps it: refs/main names the commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--someorg--tiny-bert"
    snapshot = repo / "snapshots" / commit
    tokenizer.save_pretrained(str(snapshot))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    local = _run(tmp_path, "tokenizer", str(snapshot))
    cached = _run(tmp_path, "tokenizer", "someorg/tiny-bert")
    assert local == cached == f"OK {len(tokenizer)}"
    # Weights from the same snapshot: no weight files there is a clear error, not a download.
    (snapshot / "config.json").write_text(json.dumps({"model_type": "bert"}))
    line = _run(tmp_path, "weights", "someorg/tiny-bert")
    assert line.startswith("ERROR FileNotFoundError") and "no *.safetensors" in line, line
