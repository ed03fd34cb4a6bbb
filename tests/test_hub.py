"""Tokenizer and BERT weights resolve the same way: a local directory, the Hugging Face cache, or
(online) a download; offline and not cached, a message that says what to fetch and where to put
it. The cases run in one fresh interpreter, since huggingface_hub reads HF_HOME at import."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO

SCRIPT = """
import sys
from prior_dist.data.tokenize import load_tokenizer
from prior_dist.models.state_dict import load_hf_weights
for case in sys.argv[1:]:
    what, spec = case.split("=", 1)
    try:
        load = load_tokenizer if what == "tokenizer" else load_hf_weights
        print("OK", len(load(spec)))
    except (ValueError, OSError) as err:
        print("ERROR", type(err).__name__, str(err).replace("\\n", " "))
"""


def test_local_cached_and_missing_pretrained_files(tmp_path, tokenizer):
    """A snapshot laid out as the Hugging Face cache keeps it (refs/main names the commit)
    loads offline as its local directory does; a hub id neither local nor cached is a
    PretrainedUnavailable naming the field and the command to fetch it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--someorg--tiny-bert"
    snapshot = repo / "snapshots" / commit
    tokenizer.save_pretrained(str(snapshot))
    (snapshot / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    cases = [
        f"tokenizer={snapshot}",
        "tokenizer=someorg/tiny-bert",
        "weights=someorg/tiny-bert",
        "tokenizer=someorg/some-bert",
        "weights=someorg/some-bert",
        f"tokenizer={tmp_path / 'no' / 'such' / 'dir'}",
    ]
    env = dict(
        os.environ,
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(REPO),
        TRANSFORMERS_VERBOSITY="error",
    )
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, *cases], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    local, cached, no_weights, tok_missing, weights_missing, bad_path = proc.stdout.splitlines()
    assert local == cached == f"OK {len(tokenizer)}"
    # A cached snapshot without weight files is a clear error, not a download.
    assert no_weights.startswith("ERROR FileNotFoundError") and "no *.safetensors" in no_weights
    for line, field in (
        (tok_missing, "data.tokenizer"),
        (weights_missing, "model.text.pretrained"),
    ):
        assert line.startswith("ERROR PretrainedUnavailable"), line
        assert f"{field}='someorg/some-bert'" in line and "HF_HUB_OFFLINE is set" in line
        assert "hf download someorg/some-bert --local-dir DIR" in line
        assert f"--set {field}=DIR" in line
    assert bad_path.startswith("ERROR PretrainedUnavailable") and "no such directory" in bad_path
