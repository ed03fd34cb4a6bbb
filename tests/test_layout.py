"""The shape of the code, checked: imports go down (import-linter runs in CI), function-local
imports are for optional heavy dependencies only, functions fit on a screen, and every recipe
field is read by the code."""

from __future__ import annotations

import ast
import dataclasses
import functools
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
    "wandb",
    "pydicom",
    "webdataset",
    "transformers",
    "huggingface_hub",
    "fsspec",
    "torchvision.io",
)
MAX_FUNCTION_LINES = 60


@functools.cache
def _modules() -> tuple:
    """(path, source, syntax tree) of every module of the package, parsed once."""
    return tuple(
        (path.relative_to(PACKAGE.parent), path.read_text(), ast.parse(path.read_text()))
        for path in sorted(PACKAGE.rglob("*.py"))
    )


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


def test_files_are_renamed_into_place_by_the_atomic_helper_alone():
    """A file others may find appears whole or not at all: `prior_dist/atomic.py` writes,
    fsyncs and renames it (and the directory). No other module calls `os.replace` or
    `os.rename`, where that rule would be written a second time, and forgotten."""
    found = []
    for path, _, tree in _modules():
        if path.name == "atomic.py":
            continue
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("replace", "rename")
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "os"
            ):
                found.append(f"{path}:{node.lineno} os.{node.func.attr}")
    assert not found, "use prior_dist.atomic:\n" + "\n".join(found)


# Where a config object is reached: the attribute names that hold one (`recipe.eval`,
# `cfg.heads`, `span.config`) and those that hold a sequence of them (`train.stages`).
HOLDERS = {
    DataConfig: ({"data"}, set()),
    OptimConfig: ({"optim"}, set()),
    TrainConfig: ({"train"}, set()),
    StageConfig: ({"config"}, {"stages"}),
    CheckpointConfig: ({"checkpoint"}, set()),
    LoggingConfig: ({"logging"}, set()),
    EvalConfig: ({"eval"}, set()),
    ImageTowerConfig: ({"image"}, set()),
    TextTowerConfig: ({"text"}, set()),
    HeadsConfig: ({"heads"}, set()),
    CompatConfig: ({"compat"}, set()),
}


def _iterated(node: ast.expr) -> ast.expr:
    """`X` of `enumerate(X)`, else the node itself."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "enumerate":
        return node.args[0]
    return node


def _pairs(node: ast.Assign):
    """(target, value) pairs of an assignment, tuples unpacked (`a, b = x.a, x.b`)."""
    for target in node.targets:
        if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
            yield from zip(target.elts, node.value.elts)
        else:
            yield target, node.value


def _bound_names(function, kind) -> set[str]:
    """Names that hold a `kind` in `function`: parameters annotated with it, assignments from a
    holder attribute, loop and comprehension variables over a sequence of them."""
    one, many = HOLDERS[kind]
    single, sequences = set(), set()
    for arg in function.args.args + function.args.kwonlyargs:
        text = ast.unparse(arg.annotation) if arg.annotation is not None else ""
        if kind.__name__ in text:
            (sequences if "tuple" in text or "list" in text else single).add(arg.arg)
    for node in ast.walk(function):
        if isinstance(node, ast.Assign):
            single |= {
                t.id
                for t, v in _pairs(node)
                if isinstance(t, ast.Name) and isinstance(v, ast.Attribute) and v.attr in one
            }
        if isinstance(node, (ast.For, ast.comprehension)):
            source = _iterated(node.iter)
            holds = (isinstance(source, ast.Attribute) and source.attr in many) or (
                isinstance(source, ast.Name) and source.id in sequences
            )
            if holds:
                targets = node.target.elts if isinstance(node.target, ast.Tuple) else [node.target]
                single |= {targets[-1].id} if isinstance(targets[-1], ast.Name) else set()
    return single


def _self_attributes(cls: ast.ClassDef, kind) -> set[str]:
    """`self.X` attributes a class's `__init__` sets from a parameter annotated with `kind`."""
    init = next(
        (f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None
    )
    if init is None:
        return set()
    params = _bound_names(init, kind)
    return {
        t.attr
        for node in ast.walk(init)
        if isinstance(node, ast.Assign)
        for t, v in _pairs(node)
        if isinstance(t, ast.Attribute)
        and isinstance(t.value, ast.Name)
        and t.value.id == "self"
        and isinstance(v, ast.Name)
        and v.id in params
    }


@functools.cache
def _reads(kind) -> set[str]:
    """Fields of `kind` the package reads on an object known to be a `kind`; a class's own
    `__post_init__` (validation) does not count."""
    one, many = HOLDERS[kind]
    names = {f.name for f in dataclasses.fields(kind)}
    found = set()
    for _, _, tree in _modules():
        classes = {
            id(f): c
            for c in ast.walk(tree)
            if isinstance(c, ast.ClassDef)
            for f in c.body
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
        for function in _functions(tree):
            cls = classes.get(id(function))
            own = cls is not None and cls.name == kind.__name__
            held = _self_attributes(cls, kind) if cls is not None else set()
            if own and function.name == "__post_init__":
                continue
            bound = _bound_names(function, kind) | ({"self"} if own else set())
            for node in ast.walk(function):
                if not (isinstance(node, ast.Attribute) and node.attr in names):
                    continue
                holder = node.value
                if (
                    (isinstance(holder, ast.Attribute) and holder.attr in one)
                    or (isinstance(holder, ast.Name) and holder.id in bound)
                    or (
                        isinstance(holder, ast.Attribute)
                        and holder.attr in held
                        and isinstance(holder.value, ast.Name)
                        and holder.value.id == "self"
                    )
                    or (
                        isinstance(holder, ast.Subscript)
                        and isinstance(holder.value, ast.Attribute)
                        and holder.value.attr in many
                    )
                ):
                    found.add(node.attr)
    return found


@pytest.mark.parametrize("kind", list(HOLDERS), ids=lambda k: k.__name__)
def test_every_config_field_is_read_by_the_code(kind):
    reads = _reads(kind)
    unread = [f.name for f in dataclasses.fields(kind) if f.name not in reads]
    assert not unread, f"{kind.__name__}: fields nothing reads: {unread}"


@pytest.mark.parametrize("recipe", sorted(RECIPE_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_recipe_key_names_a_field_the_code_reads(recipe):
    raw = yaml.safe_load(recipe.read_text())
    model_parts = {
        "image": ImageTowerConfig,
        "text": TextTowerConfig,
        "heads": HeadsConfig,
        "compat": CompatConfig,
    }
    keys = []  # (dotted key, the config class it sets a field of)
    for name, values in raw.items():
        if name == "model":
            keys += [
                (f"model.{part}.{k}", model_parts[part])
                for part, fields in values.items()
                if part in model_parts
                for k in fields
            ]
        elif name in SECTIONS and isinstance(values, dict):
            keys += [(f"{name}.{k}", SECTIONS[name]) for k in values]
            for i, stage in enumerate(values.get("stages") or [] if name == "train" else []):
                keys += [(f"train.stages.{i}.{k}", StageConfig) for k in stage]
    unread = [key for key, kind in keys if key.rsplit(".", 1)[1] not in _reads(kind)]
    assert keys and not unread, f"{recipe.name}: keys no code reads: {unread}"


def shape_report(package: Path = PACKAGE, top: int = 10) -> str:
    """The numbers the re-layout was judged by: imports inside functions, the longest bodies."""
    imports = local = 0
    bodies = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for function in _functions(tree):
            bodies.append(
                (
                    _body_lines(function),
                    f"{path.relative_to(package.parent)}:{function.lineno} {function.name}",
                )
            )
            local += sum(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(function))
        imports += sum(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree))
    bodies.sort(reverse=True)
    lines = [
        f"imports: {imports}, inside functions: {local}",
        f"functions with bodies over {MAX_FUNCTION_LINES} lines: "
        f"{sum(n > MAX_FUNCTION_LINES for n, _ in bodies)}",
    ]
    lines += [f"  {n:4d}  {where}" for n, where in bodies[:top]]
    return "\n".join(lines)


if __name__ == "__main__":
    # python -m tests.test_layout [PACKAGE_DIR]: the shape numbers of a checkout.
    import sys

    print(shape_report(Path(sys.argv[1]) if len(sys.argv) > 1 else PACKAGE))
