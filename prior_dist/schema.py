"""Typed configuration sections, validated by pydantic v2.

Every section of a recipe and of the model config is a frozen pydantic dataclass declared with
`SECTION`: field types and bounds are declared once, on the field, and checked whenever a
section is built, in code or from a file. What a user writes (a recipe YAML, `--set a.b=c`, a
run directory's JSON) goes through `build`, which validates in pydantic's strict JSON mode: a
string never becomes a number, a boolean or a list of characters, an integer field refuses
2.5 and `true`, and every error names the dotted field (`train.stages.0.lr`) and what it got.

Why pydantic and not OmegaConf or tyro: the sections were already dataclasses read by
`dataclasses.replace`/`asdict` all over the code; pydantic validates them in place (nested
sections, tuples, optionals, literals, bounds) with errors located to the field, while `--set`
keeps its own small parser (YAML values, list items by index) and the DeepSpeed JSON stays the
owner of its keys.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import types
import typing
from collections.abc import Mapping
from typing import Annotated, TypeVar

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError

# The config every section is declared with: unknown fields are refused.
SECTION = ConfigDict(extra="forbid")

Probability = Annotated[float, Field(ge=0, lt=1)]
Fraction = Annotated[float, Field(ge=0, le=1)]

T = TypeVar("T")

# Recipe fields that moved: old dotted name -> new. What a user wrote and what a run directory
# saved under an old name is read under the new one (`upgrade_moved_fields`).
MOVED_FIELDS = {
    "data.eval_split": "eval.final_split",
    "model.init_from": "init_from",
    "eval.prompt_bank": "eval.bank",
}


def upgrade_moved_fields(raw: dict, warn: bool = True) -> dict:
    """A copy of the recipe mapping `raw` with each field of `MOVED_FIELDS` under its new name
    (one line on stderr per old name used when `warn`); both names set to different values is
    an error naming both."""
    out = copy.deepcopy(raw)
    for old, new in MOVED_FIELDS.items():
        section, name = old.split(".")
        holder = out.get(section)
        if not isinstance(holder, dict) or name not in holder:
            continue
        value = holder.pop(name)
        *parent, field = new.split(".")
        target = out.setdefault(parent[0], {}) if parent else out
        if target.get(field) not in (None, value):
            raise ValueError(
                f"{old} ({value!r}) and {new} ({target[field]!r}) are both set; {old} is the "
                f"old name of {new}: keep {new} only"
            )
        target[field] = value
        if warn:
            print(f"[prior_dist] {old} is now {new}: read as {new}", file=sys.stderr, flush=True)
    return out


def build(kind: type[T], values, where: str) -> T:
    """`kind` from a mapping a user wrote, validated strictly; a ValueError names each field by
    its dotted path under `where` ("": the mapping is the top level)."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{where or 'a config'} must be a mapping of fields, got {values!r}")
    # YAML can hold dates and the like: they arrive as their text (a str field takes them).
    text = json.dumps(dict(values), default=str)
    try:
        return TypeAdapter(kind).validate_json(text, strict=True)
    except ValidationError as err:
        errors = err.errors()
        # A list whose item failed also reads as too short: report the item only.
        problems = [
            _describe(kind, where, e)
            for e in errors
            if not (e["type"] == "too_short" and any(_under(o["loc"], e["loc"]) for o in errors))
        ]
        if len(problems) == 1:
            raise ValueError(problems[0]) from None
        raise ValueError(f"{len(problems)} problems:\n  " + "\n  ".join(problems)) from None


def _describe(kind: type, where: str, error: dict) -> str:
    loc = error["loc"]
    path = ".".join([where, *map(str, loc)] if where else map(str, loc))
    if error["type"] == "value_error":  # a section's own rule (__post_init__): names its fields
        message = str(error["ctx"]["error"])
        return f"{message} (in {path})" if loc else message
    if error["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"{path}: unknown field; allowed: {_fields_at(kind, loc[:-1])}"
    got = repr(error["input"])
    got = got if len(got) <= 120 else got[:117] + "..."
    if error["type"] in ("too_short", "too_long"):
        bound = "at least" if error["type"] == "too_short" else "at most"
        limit = error["ctx"]["min_length" if error["type"] == "too_short" else "max_length"]
        return f"{path}: needs {bound} {limit} items, got {got}"
    message = error["msg"][0].lower() + error["msg"][1:]
    hint = ""
    # The command-line hint only for what a recipe or --set says (built with no `where`); a
    # file's own config (a model card, config.resolved.json) is named by its path instead.
    if error["type"] in ("tuple_type", "list_type") and not where:
        hint = f" (a list; on the command line: --set '{path}=[x, y]')"
    return f"{path}: {message}, got {got}{hint}"


def _under(loc: tuple, parent: tuple) -> bool:
    return len(loc) > len(parent) and loc[: len(parent)] == parent


def _fields_at(kind: type, loc: tuple) -> list[str]:
    """The field names of the section at `loc` inside `kind` (a tuple item by its index)."""
    hint = kind
    for key in loc:
        hint = _bare(hint)
        if isinstance(key, int):
            hint = typing.get_args(hint)[0] if typing.get_args(hint) else None
        elif dataclasses.is_dataclass(hint):
            hint = typing.get_type_hints(hint).get(key)
        else:
            return []
    hint = _bare(hint)
    return (
        sorted(f.name for f in dataclasses.fields(hint)) if dataclasses.is_dataclass(hint) else []
    )


def _bare(hint):
    """`X | None` -> X."""
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return hint
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if len(args) == 1 else hint


def dotted(raw, path: str):
    """`raw["a"]["b"]` for `a.b`; None where the path leaves the nested mappings."""
    node = raw
    for key in path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node
