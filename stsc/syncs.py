"""Host syncs: the operations of a training step that make the host wait for a GPU, counted on any device.

On a GPU the host queues kernels and runs ahead of them. Some operations make it wait until the device has
caught up, as ``torch.cuda.set_sync_debug_mode("warn")`` reports:

* **read**: a device tensor's values read into Python (``.item()``, ``int()``, ``bool()``, ``.tolist()``);
* **shape**: an op whose output shape depends on values (``nonzero``, indexing with a boolean mask,
  ``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``, ``bincount``);
* **copy**: a blocking copy between host and device (a Python list as an index of a device tensor,
  ``torch.tensor(data, device=...)``, ``.to()`` / ``copy_`` across);
* **cond**: ``torch.cond`` on a device predicate (its eager kernel and the compiled one read it on the host).

A few per training step cost little; one per decoder block would stall the host once per block.

:func:`count_syncs` records each of them with the line of Python that made it, through a ``TorchFunctionMode``
(calls as written, Python arguments included) and a ``TorchDispatchMode`` (aten ops, the backward's included; the
branches of ``torch.cond`` and the Python kernels of custom ops are run inside it, so their ops are seen). It counts
eager code; compiled code is not looked into.

It runs on any device. On the CPU it counts what would sync if the model lived on a GPU: the tensors on "the
device" are the ``roots`` given (a model's parameters and buffers, a batch), those computed from them, and those
made with a ``device=`` argument other than the string ``"cpu"``; every other tensor (made without ``device=``, a
CPU generator's draws, an optimizer's step counts) is on the host, as it would be on a GPU. On a GPU the devices are
the real ones, and ``torch.cuda.set_sync_debug_mode("warn")`` counts alongside (:attr:`SyncCount.cuda_warnings`).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["Sync", "SyncCount", "count_syncs"]

aten = torch.ops.aten
_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__, torch.Tensor.__float__,
          torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.numpy}
_FROM_HOST = {torch.tensor, torch.as_tensor, torch.Tensor.new_tensor}  # Python data made into a tensor
_FACTORIES = _FROM_HOST | {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.rand, torch.randn,
                           torch.randint, torch.randperm, torch.linspace, torch.eye, torch.scalar_tensor}
_MOVES = {torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda}
_SHAPE_OPS = {aten.nonzero.default, aten.masked_select.default, aten._unique2.default, aten._unique.default,
              aten.unique_dim.default, aten.unique_consecutive.default, aten.bincount.default,
              aten.masked_scatter_backward.default}  # the backward of masked_scatter: a masked_select inside
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_SKIPPED = (str(Path(torch.__file__).parent), __file__, contextlib.__file__)
_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sync:
    kind: str  # read, shape, copy or cond (see the module docstring)
    op: str  # what made it: a Python call (Tensor.tolist, Tensor.__getitem__) or an aten op
    where: str  # file:line (function) of the innermost frame outside torch; "backward: <node>" in a backward


@dataclass
class SyncCount:
    """What :func:`count_syncs` recorded: one :class:`Sync` per host sync, in order."""

    syncs: list[Sync] = field(default_factory=list)
    cuda_warnings: int | None = None  # on a GPU: the syncs torch.cuda.set_sync_debug_mode("warn") reported

    @property
    def total(self) -> int:
        return len(self.syncs)

    def by_location(self) -> Counter:
        """``(where, op, kind)`` -> how many syncs it made."""
        return Counter((s.where, s.op, s.kind) for s in self.syncs)

    def summary(self) -> str:
        lines = [f"{self.total} host syncs" + (f" ({self.cuda_warnings} reported by CUDA's sync debug mode)"
                                                if self.cuda_warnings is not None else "")]
        lines += [f"  {n:>3} x {kind:<5} {op:<32} {where}" for (where, op, kind), n in self.by_location().items()]
        return "\n".join(lines)


@contextlib.contextmanager
def count_syncs(*roots):
    """Count the host syncs of what runs inside: ``with count_syncs(model, batch) as count: step()``, then
    ``count.total``, ``count.summary()``. ``roots``: modules (their parameters and buffers), tensors, or pytrees
    of tensors that are on the device (on the CPU, what stands for it; see the module docstring)."""
    tensors = []
    for root in roots:
        tensors += [*root.parameters(), *root.buffers()] if isinstance(root, torch.nn.Module) else [
            leaf for leaf in pytree.tree_leaves(root) if isinstance(leaf, torch.Tensor)]
    counter = _Counter(tensors)
    cuda = torch.cuda.is_available() and any(t.is_cuda for t in tensors)
    with contextlib.ExitStack() as stack:
        if cuda:
            caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            stack.callback(torch.cuda.set_sync_debug_mode, previous)
        stack.enter_context(counter.counting())
        yield counter.count
    if cuda:
        counter.count.cuda_warnings = sum("synchroniz" in str(w.message) for w in caught)


class _Counter:
    """The state both modes share: which tensors are on the device, and whether a sync is being recorded."""

    def __init__(self, roots: list[torch.Tensor]):
        self.count = SyncCount()
        self.emulated = not any(t.device.type != "cpu" for t in roots)  # on the CPU: roots stand for the device
        self.device = WeakIdKeyDictionary({t: True for t in roots} if self.emulated else {})
        self.recording = False  # inside a Python call already recorded: its aten ops are not counted again
        self.functions, self.dispatch = _FunctionMode(self), _DispatchMode(self)

    def on_device(self, value) -> bool:
        if not isinstance(value, torch.Tensor):
            return False
        return value in self.device if self.emulated else value.device.type != "cpu"

    def names_device(self, device) -> bool:
        """Whether a ``device=`` argument puts a tensor on the device (emulated: anything but ``"cpu"``)."""
        if device is None:
            return False
        if self.emulated:
            return not (isinstance(device, str) and device.startswith("cpu"))
        return torch.device(device).type != "cpu"

    def mark(self, value, on_device: bool = True) -> None:
        """Emulated: put a tensor the emulation cannot follow on the device (or on the host)."""
        if self.emulated and isinstance(value, torch.Tensor):
            if on_device:
                self.device[value] = True
            else:
                self.device.pop(value, None)

    def propagate(self, outputs, inputs) -> None:
        """Emulated: an op's new outputs are on the device when one of its inputs is."""
        inputs = [x for x in pytree.tree_leaves(inputs) if isinstance(x, torch.Tensor)]
        if self.emulated and any(self.on_device(x) for x in inputs):
            for out in pytree.tree_leaves(outputs):
                if isinstance(out, torch.Tensor) and not any(out is x for x in inputs):
                    self.device[out] = True

    def record(self, kind: str, op: str, times: int = 1) -> None:
        if self.recording:
            return
        node = torch._C._current_autograd_node()
        where = f"backward: {node.name()}" if node is not None else _caller()
        self.count.syncs += [Sync(kind, op, where)] * times

    @contextlib.contextmanager
    def counting(self):
        """Both modes on (again, inside one of them), each unless it is on already."""
        with contextlib.ExitStack() as stack:
            if self.dispatch not in _get_current_dispatch_mode_stack():
                stack.enter_context(self.dispatch)
            if self.functions not in _get_current_function_mode_stack():
                stack.enter_context(self.functions)
            yield

    @contextlib.contextmanager
    def recorded(self, kind: str, op: str, times: int = 1):
        """Record a Python call's syncs, and not the aten ops it runs."""
        if times <= 0:
            yield
            return
        self.record(kind, op, times)
        outer, self.recording = self.recording, True
        try:
            yield
        finally:
            self.recording = outer


def _caller() -> str:
    """The innermost frame outside torch (and this module), as ``path:line (function)``."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_SKIPPED):
        frame = frame.f_back
    if frame is None:
        return "?"
    path = Path(frame.f_code.co_filename)
    shown = path.relative_to(_ROOT) if path.is_relative_to(_ROOT) else path.name
    return f"{shown}:{frame.f_lineno} ({frame.f_code.co_name})"


def _op_name(func) -> str:
    name = getattr(func, "__name__", str(func))
    return f"Tensor.{name}" if "Tensor" in getattr(func, "__qualname__", "") else f"torch.{name}"


class _FunctionMode(TorchFunctionMode):
    """Python calls: reads into Python, Python data made into device tensors, moves between host and device."""

    def __init__(self, counter: _Counter):
        super().__init__()
        self.c = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.c
        with c.recorded(*self._syncs(func, args, kwargs)):
            out = func(*args, **kwargs)
        if func in _FACTORIES and self._to_device(func, args, kwargs):
            c.mark(out)
        elif func in _MOVES and c.emulated:
            target = self._move_target(func, args, kwargs)
            if target is not None and (target or out is not args[0]):  # .cpu() of a CPU tensor returns it
                c.mark(out, target)
        return out

    def _syncs(self, func, args, kwargs) -> tuple[str, str, int]:
        """``(kind, op, how many)`` host syncs the call makes itself (0: none, or left to its aten ops)."""
        c, name = self.c, _op_name(func)
        if func in _READS:
            return "read", name, int(c.on_device(args[0]))
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and c.on_device(args[0]):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            values = args[2:3] if func is torch.Tensor.__setitem__ else ()
            return "copy", name, sum(isinstance(i, (list, tuple)) for i in (*index, *values))
        if func in _FROM_HOST:
            data = args[1] if func is torch.Tensor.new_tensor else args[0] if args else kwargs.get("data")
            return "copy", name, int(not isinstance(data, torch.Tensor) and self._to_device(func, args, kwargs))
        if func in _MOVES and c.emulated and not kwargs.get("non_blocking"):
            target = self._move_target(func, args, kwargs)
            return "copy", name, int(target is not None and target != c.on_device(args[0]))
        return "", name, 0

    def _to_device(self, func, args, kwargs) -> bool:
        """Whether a factory call makes its tensor on the device."""
        if func is torch.Tensor.new_tensor and "device" not in kwargs:
            return self.c.on_device(args[0])
        return self.c.names_device(kwargs.get("device"))

    def _move_target(self, func, args, kwargs) -> bool | None:
        """Emulated: whether ``.to()`` / ``.cpu()`` / ``.cuda()`` moves to the device (None: no device named)."""
        if func is not torch.Tensor.to:
            return func is torch.Tensor.cuda
        for value in (kwargs.get("device"), *args[1:]):
            if isinstance(value, torch.Tensor):
                return self.c.on_device(value)
            if isinstance(value, (str, torch.device)):
                return self.c.names_device(value)
        return None


class _DispatchMode(TorchDispatchMode):
    """Aten ops (forward and backward): value-dependent shapes, scalar reads, host-device copies, torch.cond."""

    supports_higher_order_operators = True

    def __init__(self, counter: _Counter):
        super().__init__()
        self.c = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.c
        if func is torch.ops.higher_order.cond:
            pred, true_fn, false_fn, operands = args
            if c.on_device(pred):
                c.record("cond", "torch.cond")
            branch = true_fn if pred else false_fn
            with c.counting():  # the branch's ops, counted: what the dense kernel runs
                return branch(*operands)
        kernel = _python_kernel(func, args)
        if kernel is not None:  # a custom op's Python kernel, run with its ops counted
            with c.counting():
                out = kernel(*args, **kwargs)
        else:
            kind = self._sync(func, args, kwargs)
            if kind:
                c.record(kind, str(func).removesuffix(".default"))
            out = func(*args, **kwargs)
        c.propagate(out, (args, kwargs))
        return out

    def _sync(self, func, args, kwargs) -> str:
        c = self.c
        if func is aten._local_scalar_dense.default or func in (aten.equal.default, aten.is_nonzero.default):
            return "read" if any(c.on_device(a) for a in args) else ""
        if func in _SHAPE_OPS or func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            return "shape" if c.on_device(args[0]) else ""
        if func in _INDEX_OPS:
            masks = [i for i in args[1] if isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)]
            return "shape" if masks and c.on_device(args[0]) else ""
        if func is aten.copy_.default and not kwargs.get("non_blocking") and (len(args) < 3 or not args[2]):
            return "copy" if c.on_device(args[0]) != c.on_device(args[1]) else ""
        if func is aten._to_copy.default and not c.emulated and not kwargs.get("non_blocking"):
            device = kwargs.get("device")
            return "copy" if device is not None and c.on_device(args[0]) != c.names_device(device) else ""
        return ""


def _python_kernel(func, args):
    """The Python kernel a ``torch.library.custom_op`` runs for ``args`` (None for other ops)."""
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(getattr(func, "_name", None)) if isinstance(func, torch._ops.OpOverload) else None
    if opdef is None:
        return None
    device = next((a.device.type for a in pytree.tree_leaves(args) if isinstance(a, torch.Tensor)), None)
    return opdef._backend_fns.get(device) or opdef._backend_fns.get(None)
