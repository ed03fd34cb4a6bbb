"""Pretrained files (a tokenizer, BERT weights) from a local directory or the Hugging Face Hub.

One resolution for both, so a recipe naming `emilyalsentzer/Bio_ClinicalBERT` gets its tokenizer
and its weights the same way: a local directory is used as it is; a hub id is taken from the
local Hugging Face cache, or downloaded when the machine is online. Offline and not cached, the
error says what to fetch on a machine with internet and where to point the recipe.
"""

from __future__ import annotations

import os
from pathlib import Path

# Everything a BERT directory may hold that loading uses: config, vocabulary and tokenizer
# files, and weights (safetensors preferred; pytorch_model.bin is read weights-only).
BERT_FILES = ("*.json", "*.txt", "*.model", "*.safetensors", "*.bin")


class PretrainedUnavailable(ValueError):
    """A hub id that is neither a local directory nor cached, and cannot be downloaded."""


def resolve_pretrained(spec: str, field: str, patterns: tuple[str, ...] = BERT_FILES) -> Path:
    """A local directory holding `spec`'s files. `field` names the recipe field that set it
    (for the message)."""
    local = Path(spec).expanduser()
    if local.is_dir():
        return local
    if local.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise PretrainedUnavailable(
            f"{field}={spec!r}: no such directory (a local path must be a directory holding a "
            "Hugging Face checkpoint or tokenizer)"
        )
    # huggingface_hub is needed only for hub ids; it takes a moment to import.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec, allow_patterns=list(patterns), local_files_only=True))
    except LocalEntryNotFoundError:
        pass  # not cached: download below, unless offline
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    reason = "HF_HUB_OFFLINE is set"
    if not offline:
        try:
            return Path(snapshot_download(spec, allow_patterns=list(patterns)))
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
            reason = f"the download failed: {type(err).__name__}: {str(err).splitlines()[0]}"
    raise PretrainedUnavailable(
        f"{field}={spec!r} is not a local directory and not in the Hugging Face cache "
        f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}), and {reason}. On a machine "
        f"with internet run `hf download {spec} --local-dir DIR` (`huggingface-cli download` "
        f"before huggingface_hub 0.34; in Python: huggingface_hub.snapshot_download({spec!r}, "
        f"local_dir='DIR')), copy DIR to this machine and pass --set {field}=DIR (a BERT "
        "recipe's tokenizer and text weights both load from such a directory)."
    )
