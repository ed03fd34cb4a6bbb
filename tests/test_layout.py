"""The shape of the code, checked: imports go down (import-linter runs in CI), function-local
imports are for optional heavy dependencies only, functions fit on a screen, and every recipe
field is read by the code."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from prior_dist.data.config import DataConfig
from prior_dist.models.config import CompatConfig, HeadsConfig, ImageTowerConfig, TextTowerConfig
from prior_dist.training.recipe import (
    RECIPE_DIR,
    SECTIONS,
    CheckpointConfig,
    EvalConfig,
    LoggingConfig,
    OptimConfig,
    StageConfig,
    TrainConfig,
)

PACKAGE = Path(__file__).resolve().parents[1] / "prior_dist"
# Imported inside functions on purpose: optional, or seconds to import and needed by few paths.
LAZY_OK = (
    "deepspeed",
    "triton",
    "flash_attn",
    "matplotlib",
    "torch.utils.tensorboard",
    "pydicom",
    "webdataset",
    "transformers",
    "huggingface_hub",
)
MAX_FUNCTION_LINES = 60


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        yield path.relative_to(PACKAGE.parent), source, ast.parse(source)


def _functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_function_local_imports_are_optional_heavy_dependencies_with_a_reason():
    bad = []
    for path, source, tree in _modules():
        lines = source.splitlines()
        for function in _functions(tree):
            for node in ast.walk(function):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                names = (
                    [node.module]
                    if isinstance(node, ast.ImportFrom)
                    else [a.name for a in node.names]
                )
                allowed = all(any(n == m or n.startswith(m + ".") for m in LAZY_OK) for n in names)
                block = lines[max(0, node.lineno - 4) : node.lineno]
                reason = any(line.strip().startswith("#") or "# " in line for line in block)
                if not (allowed and reason):
                    bad.append(
                        f"{path}:{node.lineno}: {names} (allowed: {allowed}, reason "
                        f"comment: {reason})"
                    )
    assert not bad, "function-local imports:\n" + "\n".join(bad)


def _body_lines(function) -> int:
    """Lines of a function's body, from its first statement after the docstring."""
    body = function.body
    if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return function.end_lineno - body[0].lineno + 1


def test_functions_fit_on_a_screen():
    """A body over the limit says why in the function's docstring ("Long because ...")."""
    long = []
    for path, _, tree in _modules():
        for function in _functions(tree):
            length = _body_lines(function)
            doc = ast.get_docstring(function) or ""
            if length > MAX_FUNCTION_LINES and "Long because" not in doc:
                long.append(f"{path}:{function.lineno} {function.name}: {length} lines")
    assert not long, "\n".join(long)


def _reads() -> set[str]:
    """Attribute names the package reads, outside the validation in `__post_init__`."""
    names = set()
    for _, _, tree in _modules():
        skip = {id(n) for f in _functions(tree) if f.name == "__post_init__" for n in ast.walk(f)}
        names |= {
            n.attr
            for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load) and id(n) not in skip
        }
    return names


CONFIGS = (
    DataConfig,
    OptimConfig,
    TrainConfig,
    StageConfig,
    CheckpointConfig,
    LoggingConfig,
    EvalConfig,
    ImageTowerConfig,
    TextTowerConfig,
    HeadsConfig,
    CompatConfig,
)


@pytest.mark.parametrize("kind", CONFIGS, ids=lambda k: k.__name__)
def test_every_config_field_is_read_by_the_code(kind):
    reads = _reads()
    unread = [f.name for f in dataclasses.fields(kind) if f.name not in reads]
    assert not unread, f"{kind.__name__}: fields nothing reads: {unread}"


@pytest.mark.parametrize("recipe", sorted(RECIPE_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_key_names_a_field_the_code_reads(recipe):
    raw = yaml.safe_load(recipe.read_text())
    reads = _reads()
    sections = {
        **SECTIONS,
        "image": ImageTowerConfig,
        "text": TextTowerConfig,
        "heads": HeadsConfig,
        "compat": CompatConfig,
    }
    unread = []
    for name, values in raw.items():
        if name == "model":
            for part, fields in values.items():
                if part in sections:
                    kind = sections[part]
                    unread += [
                        f"model.{part}.{k}"
                        for k in fields
                        if k not in {f.name for f in dataclasses.fields(kind)} or k not in reads
                    ]
        elif name in SECTIONS and isinstance(values, dict):
            kind = SECTIONS[name]
            unread += [
                f"{name}.{k}"
                for k in values
                if k not in {f.name for f in dataclasses.fields(kind)} or k not in reads
            ]
    assert not unread, f"{recipe.name}: keys no code reads: {unread}"
