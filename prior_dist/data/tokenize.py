"""Tokenisers and sentence-by-sentence tokenisation of reports.

A Hugging Face tokenizer loads from a local directory or a hub id. Where none is available
(offline machines, tests), a BERT WordPiece vocabulary is trained from the shards' own text with
`tokenizers` and saved, so the same vocabulary is reused on every run.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
import warnings
from collections import Counter
from pathlib import Path

from tokenizers import normalizers, pre_tokenizers

from prior_dist.atomic import publish
from prior_dist.data.hub import resolve_pretrained

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_CACHE_LIMIT = 500_000  # distinct sentences kept per worker before the cache starts over


def load_tokenizer(spec: str, field: str = "data.tokenizer"):
    """A `transformers` fast tokenizer from a local directory or a hub id (cached, or downloaded
    when online: `data.hub.resolve_pretrained`, which the BERT weights use too)."""
    # transformers takes about a second to import: only paths that make a tokenizer pay it, so
    # a bad config or a shardify run is not slowed down.
    from transformers import AutoTokenizer

    path = resolve_pretrained(spec, field)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _shard_sentences(shard_dir: Path, limit: int) -> list[str]:
    texts: list[str] = []
    for tar_path in sorted(shard_dir.glob("train-*.tar")) or sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    texts.extend(meta.get("sentences", []))
                    if len(texts) >= limit:
                        return texts
    return texts


def wordpiece_vocabulary(sentences: list[str], vocab_size: int) -> list[str]:
    """A deterministic WordPiece vocabulary: the special tokens, every character (alone and as a
    `##` continuation) and then whole words by falling frequency, ties in alphabetical order.

    (The `tokenizers` WordPiece trainer breaks frequency ties differently from one process to
    the next, so rebuilding a vocabulary on another node or run gave other token ids.)
    """

    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    words = Counter(
        word
        for sentence in sentences
        for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(sentence))
    )
    characters = sorted({c for word in words for c in word})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + characters
    vocab += [f"##{c}" for c in characters]
    known = set(vocab)
    for word, _ in sorted(words.items(), key=lambda item: (-item[1], item[0])):
        if len(vocab) >= vocab_size:
            break
        if word not in known:
            vocab.append(word)
            known.add(word)
    return vocab


def build_wordpiece(
    shard_dir: str | Path, out_dir: str | Path, vocab_size: int = 4096, max_sentences: int = 200_000
):
    """Build a lower-cased BERT WordPiece vocabulary from the shards' sentences (the same
    vocabulary for the same shards, on any machine); return a tokenizer."""
    # transformers takes about a second to import; see `load_tokenizer`.
    from transformers import BertTokenizer

    out = Path(out_dir)
    vocab = out / "vocab.txt"
    if not vocab.is_file():
        sentences = _shard_sentences(Path(shard_dir), max_sentences)
        if not sentences:
            raise ValueError(f"{shard_dir}: no report sentences found to build a vocabulary from")
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".vocab.txt.tmp.{os.getpid()}"
        tmp.write_text("".join(t + "\n" for t in wordpiece_vocabulary(sentences, vocab_size)))
        tokenizer = BertTokenizer(vocab=str(tmp), do_lower_case=True)
        # save_pretrained writes the config files AutoTokenizer needs; vocab.txt goes last so
        # its presence means the directory is complete.
        tokenizer.save_pretrained(str(out))
        publish(tmp, vocab)
    return BertTokenizer.from_pretrained(str(out))


def resolve_tokenizer(
    spec: str | None, shard_dir: str | Path | None, cache_dir: str | Path | None = None
):
    """`spec` when it loads; otherwise (with one warning) a WordPiece vocabulary built from
    shards: cached in `cache_dir`, or the shards' own `wordpiece/` when training made one, or
    else built in a temporary directory (a read-only command writes nothing there)."""
    if spec:
        try:
            return load_tokenizer(spec)
        except (OSError, ValueError) as exc:
            if shard_dir is None:
                raise
            warnings.warn(
                f"tokenizer {spec!r} is not available offline ({exc}); "
                "building a WordPiece vocabulary from the shards instead",
                stacklevel=2,
            )
    if shard_dir is None:
        raise ValueError("no tokenizer given and no shard directory to build one from")
    if cache_dir:
        return build_wordpiece(shard_dir, cache_dir)
    cached = Path(shard_dir) / "wordpiece"
    if (cached / "vocab.txt").is_file():  # training's vocabulary: loaded, not rebuilt
        return build_wordpiece(shard_dir, cached)
    with tempfile.TemporaryDirectory() as tmp:  # nothing is written beside the shards
        return build_wordpiece(shard_dir, Path(tmp) / "wordpiece")


# A report's length in tokens, [CLS] and [SEP] included: the paper's (and the reference's)
# truncation, the default of training (`data.max_tokens`) and of evaluation (reports, prompts).
MAX_TOKENS = 256


def tokenize_sentences(
    tokenizer,
    sentences: list[str],
    max_tokens: int = MAX_TOKENS,
    cache: dict[str, list[int]] | None = None,
) -> tuple[list[int], list[int]]:
    """[CLS] s1 s2 ... [SEP], tokenised sentence by sentence so boundaries are exact.

    Returns (input_ids, sentence_index) where sentence_index is -1 for special tokens. When the
    budget runs out the last sentence is cut and [SEP] kept; sentences that lost every token
    are dropped, and the kept ones are numbered 0..S-1 without gaps.
    """
    if max_tokens < 3:
        raise ValueError(f"max_tokens must be >= 3, got {max_tokens}")
    if cache is None:
        pieces = tokenizer(sentences, add_special_tokens=False)["input_ids"] if sentences else []
    else:
        # Report sentences repeat heavily ("No pneumothorax."): tokenise each distinct one once.
        missing = [s for s in dict.fromkeys(sentences) if s not in cache]
        if missing:
            if len(cache) + len(missing) > _CACHE_LIMIT:
                cache.clear()
            cache.update(zip(missing, tokenizer(missing, add_special_tokens=False)["input_ids"]))
        pieces = [cache[s] for s in sentences]
    budget = max_tokens - 2
    ids = [tokenizer.cls_token_id]
    sentence_index = [-1]
    kept = 0
    for piece in pieces:
        if budget <= 0:
            break
        piece = piece[:budget]
        if not piece:
            continue
        ids.extend(piece)
        sentence_index.extend([kept] * len(piece))
        budget -= len(piece)
        kept += 1
    ids.append(tokenizer.sep_token_id)
    sentence_index.append(-1)
    return ids, sentence_index
