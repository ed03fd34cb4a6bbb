"""Counting what a training step asks of the host: dispatched ops by phase, and host syncs.

On a CPU a model at toy widths does negligible arithmetic, so its step time is the host's
overhead; this counter says where it goes. `StepCounter` is a `TorchDispatchMode` (every aten
op dispatched, forward, backward and optimizer alike) combined with a `TorchFunctionMode` (the
Python-level reads that dispatch nothing on a CPU tensor but wait for the device on a GPU one).

A *host sync* is anything that makes the host wait for the device on CUDA:
- reading a value: `item()`, `float(t)`, `int(t)`, `bool(t)` (aten `_local_scalar_dense`),
  `tolist()`, `numpy()`, `cpu()` of a tensor (`to(device)` is not counted: on a CPU run the
  device is the host, so a move to it cannot be told from a read; code that reads a value on
  the host says so with `cpu()`, `tolist()` or `numpy()`);
- an op whose output size depends on the data (`nonzero`, `masked_select`, boolean indexing,
  `unique`, `repeat_interleave` without `output_size`) or that answers a Python bool
  (`equal`, `is_nonzero`);
- `torch.cuda.synchronize()` or the DeepSpeed accelerator's `synchronize()`.
Where the step runs on a CPU these cost nothing, which is why they hide there; counting them
on a CPU finds them before a GPU does.
"""

from __future__ import annotations

import collections
import contextlib
import sys
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten

# Ops whose result the host must wait for (values or data-dependent shapes).
_SYNC_OPS = {
    _aten._local_scalar_dense.default: "item",
    _aten.nonzero.default: "nonzero",
    _aten.masked_select.default: "masked_select",
    _aten.equal.default: "equal",
    _aten.is_nonzero.default: "is_nonzero",
    _aten._unique2.default: "unique",
    _aten.unique_dim.default: "unique",
    _aten.unique_consecutive.default: "unique",
    _aten.repeat_interleave.Tensor: "repeat_interleave",
}
_INDEX_OPS = (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default)

# Tensor methods that read device memory on the host (they dispatch nothing on a CPU tensor).
_READS = {
    torch.Tensor.tolist: "tolist",
    torch.Tensor.numpy: "numpy",
    torch.Tensor.cpu: "cpu",
}


def _bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()
    )


def _to_host(func, args, kwargs) -> bool:
    """`t.to("cpu")` (a `_to_copy` to the CPU from another device)."""
    if func is not _aten._to_copy.default:
        return False
    device = kwargs.get("device")
    return (
        device is not None and torch.device(device).type == "cpu" and args[0].device.type != "cpu"
    )


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: StepCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counter = self.counter
        counter.ops[counter.current] += 1
        counter.op_names[func.__name__] += 1
        name = _SYNC_OPS.get(func)
        if name is None and func in _INDEX_OPS and _bool_index(args):
            name = "boolean index"
        if name is None and _to_host(func, args, kwargs):
            name = "copy to host"
        if name is not None:
            counter.sync(name)
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, counter: StepCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _READS.get(func)
        if name is not None:
            self.counter.sync(name)
        return func(*args, **kwargs)


class StepCounter:
    """Ops dispatched and host syncs by phase, over every `with counter:` block.

    `with counter.phase("backward"):` files what happens inside under that phase (default
    `"step"`); `syncs` counts by kind, `syncs_in[phase]` by phase and kind.
    """

    def __init__(self) -> None:
        self.ops: collections.Counter[str] = collections.Counter()
        self.op_names: collections.Counter[str] = collections.Counter()
        self.syncs: collections.Counter[str] = collections.Counter()
        self.syncs_in: collections.defaultdict[str, collections.Counter[str]] = (
            collections.defaultdict(collections.Counter)
        )
        self.current = "step"
        self._stack = contextlib.ExitStack()

    def clear(self) -> None:
        for table in (self.ops, self.op_names, self.syncs):
            table.clear()
        self.syncs_in.clear()

    def sync(self, name: str) -> None:
        self.syncs[name] += 1
        self.syncs_in[self.current][name] += 1

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())

    def syncs_outside(self, *phases: str) -> int:
        """Host syncs in every phase but `phases`."""
        return sum(sum(c.values()) for p, c in self.syncs_in.items() if p not in phases)

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        held, self.current = self.current, name
        try:
            yield
        finally:
            self.current = held

    def _count_synchronize(self) -> None:
        """`torch.cuda.synchronize` and, when DeepSpeed is loaded, its accelerator's."""
        counter = self

        def wrap(owner, attr: str, name: str) -> None:
            original = getattr(owner, attr)

            def counted(*args, **kwargs):
                counter.sync(name)
                return original(*args, **kwargs)

            self._stack.callback(setattr, owner, attr, original)
            setattr(owner, attr, counted)

        wrap(torch.cuda, "synchronize", "synchronize")
        accelerator_module = sys.modules.get("deepspeed.accelerator")
        if accelerator_module is not None:
            wrap(accelerator_module.get_accelerator(), "synchronize", "synchronize")

    def __enter__(self) -> StepCounter:
        self._count_synchronize()
        self._stack.enter_context(_Function(self))
        self._stack.enter_context(_Dispatch(self))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._stack = contextlib.ExitStack()
