"""Capture: trace a model into torch.fx graph(s) with PyTorch's own machinery.

``capture(model, example_inputs)`` first tries ``torch.export.export(..., strict=False)``: one aten
graph with ``nn_module_stack`` on every node, general in the inputs' values. Where export fails (shapes
that depend on input values, such as per-image token counts read from per-image size or grid
metadata), it **traces** the model on the example with real tensors (``make_fx``): one aten graph
too, with module stacks, specialized to the example's values (fine for matching, which reads one
example anyway). Where that fails as well, it falls back to dynamo (``torch.compile`` with a
collecting backend), which may split the model into several graphs at graph breaks. Either way the
result is a :class:`Capture` holding the graphs and one :class:`networkx.DiGraph` of the data flow
across all of them, which is what the matcher reads. Capturing leaves the model as it was: its
buffers (e.g. batch-norm statistics) and the RNG are restored, and lazily cached attributes are
filled by one eager forward before export traces with fake tensors. Nodes of the data-flow graph are
keyed ``"g<graph>:<node name>"`` and carry:

``op``       canonical op name: ``"linear"``, ``"masked_scatter"``, ... (aten overload packet or
             torch function / method name); placeholders are ``"input"``, ``"param"``, ``"buffer"``,
             ``"constant"`` or ``"graph_input"`` (a value produced by an earlier graph).
``module``   tuple of module paths from outermost to innermost (root excluded), fully qualified
             from the top-level model even for dynamo graphs of inner frames.
``shape``    tuple of ints (symbolic sizes as strings) or None; ``dtype``: torch dtype or None.
``source``   for placeholders: the user input name or the parameter / buffer path.
``value``    for parameter, buffer and constant placeholders: the tensor (None elsewhere).
``order``    position in execution order across all graphs.

Code that runs under ``torch.no_grad()`` or ``torch.autocast`` inside the model (a block under reentrant activation
checkpointing, say) is a higher-order op in an exported graph, whose subgraph holds the region's nodes; the data flow
holds those nodes in its place (:func:`inline_regions`), so matching sees through it.

**Structure from shapes.** A model whose weights hold no data where it is captured (parameters or buffers on the
``meta`` device, or DeepSpeed ZeRO-3 partitions: ``numel`` 0 and the full shape in ``ds_shape``) is captured from
shapes alone: while capturing, every parameter and buffer is stood in for by a ``meta`` tensor of its full shape
(:func:`shape_stand_ins`), so no weight is gathered or materialized. Export then traces on the ``meta`` device with
the inputs moved there; the real-tensor trace runs on the example inputs as given, computing what depends on the
inputs alone for real (per-image sizes, positions) and everything that involves a weight on the ``meta`` device
(:class:`_MetaWeights`). The example inputs may themselves be on the ``meta`` device (or fake) where nothing in the
capture depends on their values. Otherwise graphs are traced on the model's device, the inputs moved there.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import logging
import operator
import re
import time
import types
from dataclasses import dataclass, field
from unittest import mock

import networkx as nx
import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import CaptureError, first_line

__all__ = ["Capture", "CaptureError", "KeywordCall", "add_graph", "capture", "exported_capture", "forward_kwargs",
           "frame_prefix", "holds_data", "module_paths", "shape_stand_ins"]


@dataclass
class Capture:
    method: str  # "export", "trace" or "dynamo"
    graphs: list[fx.GraphModule]
    dataflow: nx.DiGraph
    example_inputs: dict  # as given by the user (real values, never moved)
    seconds: float
    fallback_reason: str | None = None
    notes: list[str] = field(default_factory=list)
    exported: torch.export.ExportedProgram | None = None  # the export result, when export worked


def forward_kwargs(model: nn.Module, example_inputs: dict) -> tuple[dict, list[str]]:
    """The kwargs used for capture: the user's, plus ``use_cache=False`` where ``forward`` may take it.

    A key/value cache in the output is not a pytree type torch.export can return, and training never
    uses one. ``forward`` may take it when it names ``use_cache`` or takes ``**kwargs``; a forward that
    then rejects it is called without it (see :func:`capture`). Returns the kwargs and what was added.
    """
    params = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "use_cache" not in example_inputs and ("use_cache" in params or takes_any):
        return {**example_inputs, "use_cache": False}, ["passed use_cache=False (no cache is needed for training)"]
    return dict(example_inputs), []


def capture(model: nn.Module, example_inputs: dict) -> Capture:
    """Trace ``model(**example_inputs)``: torch.export, else a real-tensor trace, else dynamo."""
    kwargs, notes = forward_kwargs(model, example_inputs)
    start = time.perf_counter()
    with preserved(model), shape_stand_ins(model) as shapes_only:
        moved = _to_model_device(model, kwargs)
        if not shapes_only:
            _warm_up(model, moved)
        with _attributes_restored(model):  # what tracing caches on the model (fake tensors) is not kept
            try:
                exported = _export(model, moved)
            except TypeError as exc:
                if "use_cache" not in str(exc) or "use_cache" not in kwargs:
                    raise
                kwargs, notes = {k: v for k, v in kwargs.items() if k != "use_cache"}, []
                moved = _to_model_device(model, kwargs)
                exported = _export(model, moved)
            if not isinstance(exported, Exception):
                return exported_capture(exported, example_inputs, time.perf_counter() - start, notes,
                                        inline=True)
            reason = f"torch.export failed: {type(exported).__name__}: {first_line(exported)}"
            traced = _trace(model, kwargs if shapes_only else moved, shapes_only)
            if not isinstance(traced, Exception):
                return Capture("trace", [traced[0]], traced[1], example_inputs, time.perf_counter() - start, reason,
                               notes)
            reason += f"; the real-tensor trace failed: {type(traced).__name__}: {first_line(traced)}"
            try:
                graphs, flow = _dynamo_capture(model, moved)
            except CaptureError as exc:
                raise CaptureError(f"{reason}; {exc}" + (
                    "; the weights hold no data here, so the model was captured from their shapes alone: it cannot "
                    "compute from their values anything that decides its shapes or control flow"
                    if shapes_only else "")) from exc
    return Capture("dynamo", graphs, flow, example_inputs, time.perf_counter() - start, reason, notes)


def _full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """A tensor's full shape: its own, or a ZeRO-3 partitioned parameter's (its own is that of its empty data)."""
    return tuple(getattr(tensor, "ds_shape", tensor.shape))


def holds_data(model: nn.Module) -> bool:
    """Whether every parameter and buffer of ``model`` holds its values here: none on the ``meta`` device and none
    partitioned away (a DeepSpeed ZeRO-3 parameter outside its engine's fetch)."""
    return not any(t.is_meta or tuple(t.shape) != _full_shape(t) for t in (*model.parameters(), *model.buffers()))


@contextlib.contextmanager
def shape_stand_ins(model: nn.Module):
    """Unless ``model`` holds its data (:func:`holds_data`), stand in a ``meta`` tensor of its full shape for every
    parameter and buffer (shared ones stay shared) until the block ends; yields whether it did."""
    if holds_data(model):
        yield False
        return
    stand_ins, replaced = {}, []
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in list(store.items()):
                if tensor is None:
                    continue
                if id(tensor) not in stand_ins:
                    meta = torch.empty(_full_shape(tensor), dtype=tensor.dtype, device="meta")
                    stand_ins[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) \
                        if isinstance(tensor, nn.Parameter) else meta
                replaced.append((store, name, tensor))
                store[name] = stand_ins[id(tensor)]
    try:
        yield True
    finally:
        for store, name, tensor in replaced:
            store[name] = tensor


@contextlib.contextmanager
def _attributes_restored(model: nn.Module):
    """Put back the attributes of every module, and of the plain objects modules hold (a config, a vocabulary
    mapping), that tracing set to values holding tensors: values a model computes lazily at its first forward
    (``functools.cached_property``, a rotary cache) are otherwise kept with the fake or meta tensors of the trace that
    computed them. Other changes stay: a flag saying hooks were installed goes with the hooks it counts."""
    owners = list(model.modules())
    owners += [value for module in owners for value in vars(module).values() if _plain_object(value)]
    saved = [(owner, dict(vars(owner))) for owner in owners]
    try:
        yield
    finally:
        for owner, before in saved:
            attributes = vars(owner)
            for name in [name for name, value in attributes.items()
                         if (name not in before or before[name] is not value) and _holds_tensor(value)]:
                if name in before:
                    attributes[name] = before[name]
                else:
                    del attributes[name]


def _holds_tensor(value) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(value))


def _plain_object(value) -> bool:
    return hasattr(value, "__dict__") and not isinstance(value, (nn.Module, torch.Tensor, type, types.ModuleType,
                                                                  types.FunctionType, types.MethodType))


@contextlib.contextmanager
def preserved(model: nn.Module):
    """Run something that may run ``model`` for real, then put back its buffers and the RNG state."""
    buffers = [(b, b.detach().clone()) for b in model.buffers() if b.device.type != "meta"]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)


def _warm_up(model: nn.Module, kwargs: dict) -> None:
    """One eager forward, so attributes a model caches lazily hold real tensors, not export's fake ones."""
    if any(p.is_meta for p in model.parameters()):
        return
    with torch.no_grad(), contextlib.suppress(Exception):  # a model that cannot run fails in capture, with the reason
        model(**kwargs)


class KeywordCall(nn.Module):
    """``model(**inputs)`` as a module whose forward takes the tensor inputs positionally, in ``names`` order (what
    make_fx traces), or by keyword: its signature names them, so torch.export records them by name and an exported
    program's ``module()`` is called as the model is, ``(**batch)``. The non-tensor inputs are fixed."""

    def __init__(self, model: nn.Module, inputs: dict):
        super().__init__()
        self.inner = model
        self.names = [name for name, value in inputs.items() if isinstance(value, torch.Tensor)]
        self.constants = {name: value for name, value in inputs.items() if name not in self.names}
        self.forward = _named(self._call, self.names)

    def _call(self, *values, **named):
        return self.inner(**dict(zip(self.names, values)), **named, **self.constants)

    def values(self, inputs: dict) -> tuple:
        """The positional arguments for a call with keyword ``inputs``."""
        missing = [name for name in self.names if name not in inputs]
        if missing:
            raise TypeError(f"missing inputs {', '.join(missing)}: this graph was built for "
                            f"{', '.join(self.names)}")
        return tuple(inputs[name] for name in self.names)

    def keywords(self, inputs: dict) -> dict:
        """The keyword arguments, in ``names`` order, for a call with ``inputs`` (the others are left out)."""
        return dict(zip(self.names, self.values(inputs)))


def _named(function, names: list[str]):
    """``function(*values, **named)`` with a signature whose parameters are ``names``."""
    def forward(*values, **named):
        return function(*values, **named)

    forward.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in names])
    return forward


def _trace(model: nn.Module, kwargs: dict, meta_weights: bool) -> tuple[fx.GraphModule, nx.DiGraph] | Exception:
    """A real-tensor ``make_fx`` trace of ``model(**kwargs)`` with module stacks; the exception if it fails.
    ``meta_weights``: the weights are ``meta`` stand-ins and the inputs real (see :class:`_MetaWeights`)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    call = KeywordCall(model, kwargs)

    # make_fx records module paths relative to `_orig_mod`, or, once a module is shared by two parents, as the
    # attributes read to reach each module: tracing `call` itself, these would start at `call.inner`
    def run(*values):
        return model(**dict(zip(call.names, values)), **call.constants)

    run._orig_mod = model
    try:
        with _quiet("torch.fx.experimental.proxy_tensor", "torch.fx.experimental.symbolic_shapes"), \
                _no_stack_traces(), _one_fake_mode(), \
                _meta_weights(_device_of(kwargs)) if meta_weights else contextlib.nullcontext():
            gm = make_fx(run, tracing_mode="real", record_module_stack=True,
                         _error_on_data_dependent_ops=False)(*call.values(kwargs))
    except Exception as exc:  # noqa: BLE001 - any failure means: fall back, and say why
        return exc
    return gm, _trace_dataflow(gm, model, call.names)


_INDEXING = frozenset({torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
                       torch.ops.aten._unsafe_index.Tensor, torch.ops.aten._index_put_impl_.default})


class _MetaWeights(TorchDispatchMode):
    """The real-tensor trace of a model whose weights are ``meta`` stand-ins, on real example inputs: an op on values
    computed from the inputs alone runs for real, so the trace specializes to the example as the real-tensor trace
    does (per-image sizes, positions, masks); an op that also reads a ``meta`` tensor (a weight, or anything computed
    from one) runs on the ``meta`` device, real operands moved there (boolean index masks first made integer indices,
    as their count is a shape). Moving a real value to the ``meta`` device keeps it real, and so does an integer
    ``arange`` made on it (``torch.arange(n, device=weight.device)``: positions, lengths and masks, which decide
    shapes; it is made on ``device``, the inputs'); a buffer made there to be filled (``zeros``, ``full``) stays on
    ``meta``. An op that would write a ``meta`` value into a real tensor fails (the trace falls back to dynamo, with
    the reason)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func.overloadpacket is torch.ops.aten.arange and _asks_for_meta(kwargs):
            return _made_real(func, args, kwargs, self.device)
        if not any(t.is_meta for t in tensors):
            if func is torch.ops.aten._to_copy.default and _asks_for_meta(kwargs):
                kwargs = {k: v for k, v in kwargs.items() if k != "device"}
            return func(*args, **kwargs)
        if all(t.is_meta for t in tensors):
            return _on_meta(func, args, kwargs)
        written = func._schema.arguments[0].alias_info
        if written is not None and written.is_write and not args[0].is_meta:
            raise RuntimeError(f"{func} writes a value computed from the weights into one computed from the inputs "
                               f"alone: not traceable from the weights' shapes")
        if func in _INDEXING:
            indices = [part for index in args[1] for part in
                       (index.nonzero(as_tuple=True) if _is_real_mask(index) else (index,))]
            args = (args[0], indices, *args[2:])
        args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
        return _on_meta(func, args, kwargs)


_BFLOAT16_ON_META = frozenset({torch.ops.aten._grouped_mm.default})  # meta kernels that take bfloat16 only


def _on_meta(func, args, kwargs):
    """``func`` on ``meta`` operands. A meta kernel that takes bfloat16 only (grouped matmul's: a CUDA kernel's limit,
    not the CPU's; a mixture of experts in float32 calls it on ``meta``) computes the shape in bfloat16, and the result
    is given the operands' dtype."""
    dtype = next((t.dtype for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor) and t.is_floating_point()),
                 torch.bfloat16)
    if func not in _BFLOAT16_ON_META or dtype == torch.bfloat16:
        return func(*args, **kwargs)
    args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.to(torch.bfloat16) if t.is_floating_point() else t,
                                        (args, kwargs))
    return func(*args, **kwargs).to(dtype)


class _RealConstants(TorchFunctionMode):
    """``torch.tensor(data, device=<meta>)`` of integers or booleans (a grid, a size: made from no weight) is made real
    on ``device``, as :class:`_MetaWeights` makes an integer ``arange`` (this constructor is not dispatched)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.tensor and _asks_for_meta(kwargs):
            return _made_real(func, args, kwargs, self.device)
        return func(*args, **kwargs)


def _asks_for_meta(kwargs: dict) -> bool:
    return kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "meta"


def _made_real(make, args, kwargs, device: torch.device) -> torch.Tensor:
    """What ``make`` makes from no tensor on the ``meta`` device, made on ``device`` where it is integer or boolean
    (a position, a length, a mask, a grid: computed from no weight, and deciding shapes); a floating result goes back
    to ``meta``."""
    made = make(*args, **{**kwargs, "device": device})
    return made.to("meta") if made.is_floating_point() or made.is_complex() else made


@contextlib.contextmanager
def _meta_weights(device: torch.device):
    """The modes of the real-tensor trace of a model whose weights are ``meta`` stand-ins (inputs on ``device``)."""
    with _RealConstants(device), _MetaWeights(device):
        yield


def _is_real_mask(index) -> bool:
    return isinstance(index, torch.Tensor) and not index.is_meta and index.dtype in (torch.bool, torch.uint8)


def _trace_dataflow(gm: fx.GraphModule, model: nn.Module, names: list[str]) -> nx.DiGraph:
    """The data flow of a ``make_fx`` graph: placeholders are the inputs in order; constants are matched to
    the model's parameters and buffers by identity."""
    named = {id(t): ("param", name) for name, t in model.named_parameters()}
    named.update({id(t): ("buffer", name) for name, t in model.named_buffers()})
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    sources = {node.name: ("input", name) for node, name in zip(placeholders, names)}
    values = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = getattr(gm, node.target)
            sources[node.name] = named.get(id(value), ("constant", str(node.target)))
            values[node.name] = value
    flow = nx.DiGraph()
    add_graph(flow, gm, 0, 0, sources, values, inline=True)
    return flow


def _export(model: nn.Module, kwargs: dict) -> torch.export.ExportedProgram | Exception:
    """``torch.export`` (non-strict) of ``model(**kwargs)``; the exception when export fails.

    A ``TypeError`` about ``use_cache`` is raised instead, so the caller can drop that argument.
    """
    try:
        with _quiet("torch._export", "torch.export", "torch._dynamo", "torch.fx.experimental.symbolic_shapes"):
            return torch.export.export(model, (), kwargs, strict=False)
    except TypeError as exc:
        if "use_cache" in str(exc):
            raise
        return exc
    except Exception as exc:  # noqa: BLE001 - any export failure means: fall back, and say why
        return exc


# --------------------------------------------------------------------------------------- helpers
def _one_fake_mode():
    """make_fx describes each real value of its trace by a fake tensor of a new fake mode (most of a large model's
    tracing time); one shared mode describes them as well."""
    from torch._guards import TracingContext, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode

    return tracing(TracingContext(FakeTensorMode(allow_fallback_kernels=True)))


def _no_stack_traces():
    """make_fx records every node's Python stack (most of a large model's tracing time); matching reads none."""
    import torch.fx.config

    return mock.patch.object(torch.fx.config, "do_not_emit_stack_traces", True)


@contextlib.contextmanager
def _quiet(*logger_names: str):
    """Silence torch's loggers and its stderr dump of partial graphs while a capture attempt may fail.

    The failure itself is reported once, in :attr:`Capture.fallback_reason`.
    """
    loggers = [logging.getLogger(name) for name in logger_names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _device_of(kwargs: dict) -> torch.device:
    """Where the real tensors of ``kwargs`` are (the CPU where none is)."""
    real = [t for t in pytree.tree_leaves(kwargs) if isinstance(t, torch.Tensor) and not t.is_meta]
    return real[0].device if real else torch.device("cpu")


def _to_model_device(model: nn.Module, kwargs: dict) -> dict:
    param = next(model.parameters(), None)
    if param is None:
        return kwargs
    device = param.device
    return pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), kwargs)


def op_name(node: fx.Node) -> str:
    """A family-independent name for what a node computes: ``linear``, ``cat``, ``masked_scatter``..."""
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        packet = getattr(node.target, "overloadpacket", None)
        return packet.__name__ if packet is not None else getattr(node.target, "__name__", str(node.target))
    if node.op == "call_module":
        return "module"
    return node.op


def _value(node: fx.Node):
    return node.meta.get("val", node.meta.get("example_value"))


def _shape_dtype(node: fx.Node):
    val = _value(node)
    if isinstance(val, torch.Tensor):
        shape = tuple(int(s) if isinstance(s, int) or str(s).lstrip("-").isdigit() else str(s) for s in val.shape)
        return shape, val.dtype
    return None, None


def module_paths(node: fx.Node, prefix: str = "", frame_root: str = "") -> tuple[str, ...]:
    stack = node.meta.get("nn_module_stack") or {}
    paths = []
    for path, _cls in stack.values():
        if frame_root and path.startswith(frame_root):
            path = path[len(frame_root):].lstrip(".")
        path = ".".join(p for p in (prefix, path) if p)
        if path and path not in paths:
            paths.append(path)
    return tuple(paths)


def add_graph(flow: nx.DiGraph, gm: fx.GraphModule, index: int, order_base: int, sources: dict,
               values: dict, prefix: str = "", frame_root: str = "", inline: bool = False) -> dict[str, str]:
    """Add one graph's nodes and edges to ``flow``; return fx node name -> data-flow key.

    ``sources``: placeholder name -> (kind, source); ``values``: placeholder name -> tensor (parameters,
    buffers and constants). ``inline``: add the nodes inside region ops (:func:`inline_regions`) in their place, as
    capture does for matching; the lowerings, which rewrite ``gm`` itself, match the nodes ``gm`` has.
    """
    gm, aliases = inline_regions(gm) if inline else (gm, {})
    keys = {}
    for position, node in enumerate(gm.graph.nodes):
        key = f"g{index}:{node.name}"
        keys[node.name] = key
        shape, dtype = _shape_dtype(node)
        kind, source = sources.get(node.name, (None, None)) if node.op in ("placeholder", "get_attr") else (None, None)
        flow.add_node(key, fx=node, graph=index, op=kind or op_name(node), source=source, value=values.get(node.name),
                      module=module_paths(node, prefix, frame_root), shape=shape, dtype=dtype,
                      order=order_base + position)
        for arg in node.all_input_nodes:
            flow.add_edge(keys[arg.name], key)
    for writer, reader in _reads_after_writes(gm.graph):
        flow.add_edge(keys[writer.name], keys[reader.name])
    keys.update({name: keys[replacement] for name, replacement in aliases.items()})
    return keys


def _reads_after_writes(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node]]:
    """``(writer, reader)`` for each node that reads a buffer made from no tensor (``full``, ``zeros``, ``empty``)
    after an in-place aten op wrote into it, through a view of it or another: ``pad_sequence`` copies each sequence
    into a slice of a new zero buffer, whose readers would otherwise see a constant. A write into a tensor that
    carries data already stays a change to it (its readers depend on it anyway): a block that updates its output in
    place hands the next block that one value."""
    order, root, sharing = {}, {}, {}
    for position, node in enumerate(graph.nodes):
        order[node] = position
        viewed, _ = _aliased_operands(node)
        if node.target is operator.getitem and node.args[0] in root:  # a sequence of views (split)
            viewed = node.args[0]
        if viewed is not None:
            root[node] = root.get(viewed, viewed)
            sharing.setdefault(root[node], [root[node]]).append(node)
    pairs = []
    for writer in graph.nodes:
        for written in _aliased_operands(writer)[1]:
            base = root.get(written, written)
            if base.op == "call_function" and not base.all_input_nodes:
                for alias in sharing.get(base, [base]):
                    pairs += [(writer, reader) for reader in alias.users if order[reader] > order[writer]]
    return pairs


def _aliased_operands(node: fx.Node) -> tuple[fx.Node | None, list[fx.Node]]:
    """For an aten op: the operand its result is a view of (a view op's or an in-place op's) and the operands it
    writes into, read from its schema; ``(None, [])`` for any other node."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is None:
        return None, []
    operands = {**dict(zip((a.name for a in schema.arguments), node.args)), **node.kwargs}
    aliased = [(operands.get(a.name), a.alias_info) for a in schema.arguments if a.alias_info is not None]
    aliased = [(operand, info) for operand, info in aliased if isinstance(operand, fx.Node)]
    result = schema.returns[0].alias_info if schema.returns else None
    viewed = next((operand for operand, info in aliased
                   if result is not None and set(info.before_set) & set(result.before_set)), None)
    return viewed, [operand for operand, info in aliased if info.is_write]


# higher-order ops that call their one subgraph once, on the operands that follow it: torch.export wraps code run
# under torch.no_grad() or torch.autocast (a reentrant activation checkpoint runs its block under no_grad) in
# them, dynamo a non-reentrant checkpoint
REGION_OPS = frozenset({"wrap", "wrap_with_set_grad_enabled", "wrap_with_autocast", "tag_activation_checkpoint"})


def inline_regions(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[str, str]]:
    """``gm`` with every :data:`REGION_OPS` call replaced by the nodes of its subgraph, so the data flow shows what
    the region computes (module stacks included) and not one opaque call; ``gm`` itself when it has none.

    Returns the graph module and, for each node removed (the region's ``getitem`` results), the name of the node
    now computing its value.
    """
    if not any(_region(node, gm) for node in gm.graph.nodes):
        return gm, {}
    graph, env = fx.Graph(), {}
    graph.output(graph.graph_copy(gm.graph, env))
    flat = fx.GraphModule(gm, graph)
    aliases = {}
    for node in list(flat.graph.nodes):
        found = _region(node, flat)
        if found is None:
            continue
        sub, operands = found
        sub = inline_regions(sub)[0]  # regions nested in it
        copied = dict(zip([n for n in sub.graph.nodes if n.op == "placeholder"], operands))
        with flat.graph.inserting_before(node):
            results = flat.graph.graph_copy(sub.graph, copied)
        for inner, outer in copied.items():
            if inner.op == "get_attr":  # a tensor the region reads: the flat module holds it under a name of its own
                outer.target = f"_{node.name}_{inner.target.replace('.', '_')}"
                setattr(flat, outer.target, functools.reduce(getattr, inner.target.split("."), sub))
        results = results if isinstance(results, (tuple, list)) else (results,)
        for user in list(node.users):
            aliases[user.name] = results[user.args[1]].name
            user.replace_all_uses_with(results[user.args[1]])
            flat.graph.erase_node(user)
        flat.graph.erase_node(node)
    flat.graph.eliminate_dead_code(lambda n: n.op != "get_attr")  # only the references to the inlined subgraphs
    flat.recompile()
    return flat, aliases


def _region(node: fx.Node, gm: fx.GraphModule) -> tuple[fx.GraphModule, tuple] | None:
    """``(subgraph, operands)`` when ``node`` calls a region op whose results are only read by index (its keyword
    arguments are options, such as a checkpoint's ``use_reentrant``)."""
    if node.op != "call_function" or op_name(node) not in REGION_OPS:
        return None
    at = next((i for i, a in enumerate(node.args) if isinstance(a, fx.Node) and a.op == "get_attr"
               and isinstance(getattr(gm, a.target, None), fx.GraphModule)), None)
    if at is None or not all(u.target is operator.getitem and isinstance(u.args[1], int) for u in node.users):
        return None
    sub, operands = getattr(gm, node.args[at].target), node.args[at + 1:]
    if len(operands) != sum(n.op == "placeholder" for n in sub.graph.nodes):
        return None
    return sub, operands


def exported_capture(exported: torch.export.ExportedProgram, example_inputs: dict, seconds: float = 0.0,
                     notes: list[str] | None = None, input_names: list[str] | None = None,
                     inline: bool = False) -> Capture:
    """The :class:`Capture` of an exported program. ``input_names``: the model input each user input of the
    program stands for, in order (default: the program's own names); ``inline``: see :func:`add_graph`."""
    return Capture("export", [exported.graph_module], _export_dataflow(exported, input_names, inline), example_inputs,
                   seconds, None, notes or [], exported)


def _export_dataflow(exported: torch.export.ExportedProgram, input_names: list[str] | None = None,
                     inline: bool = False) -> nx.DiGraph:
    sig = exported.graph_signature
    sources = {name: ("param", fqn) for name, fqn in sig.inputs_to_parameters.items()}
    sources.update({name: ("buffer", fqn) for name, fqn in sig.inputs_to_buffers.items()})
    sources.update({name: ("constant", fqn) for name, fqn in sig.inputs_to_lifted_tensor_constants.items()})
    user_inputs = [name for name in sig.user_inputs if isinstance(name, str)]
    sources.update({name: ("input", source) for name, source in zip(user_inputs, input_names or user_inputs)})
    tensors = {**exported.state_dict, **exported.constants}
    values = {name: tensors.get(fqn) for name, (kind, fqn) in sources.items() if kind != "input"}
    flow = nx.DiGraph()
    add_graph(flow, exported.graph_module, 0, 0, sources, values, inline=inline)
    return flow


# ----------------------------------------------------------------------------------------- dynamo
_DYNAMO_SELF = "L['self']"  # how dynamo's nn_module_stack names the traced frame's module


def _dynamo_capture(model: nn.Module, kwargs: dict) -> tuple[list[fx.GraphModule], nx.DiGraph]:
    """Run the model once under torch.compile with a backend that records every graph it is given.

    Values crossing graph breaks are linked by tensor identity at run time: each graph's outputs are
    remembered, and a later graph's input that *is* one of those tensors gets an edge from the
    producing node. Parameter placeholders are identified the same way, which also gives the module
    path of the frame each graph was traced from (dynamo names modules relative to that frame).
    """
    named = {id(t): ("param", name) for name, t in model.named_parameters()}
    named.update({id(t): ("buffer", name) for name, t in model.named_buffers()})
    inputs = {id(t): name for name, t in kwargs.items() if isinstance(t, torch.Tensor)}
    produced: dict[int, str] = {}  # id(tensor) -> data-flow key of the node that produced it
    keep_alive: list = []
    graphs: list[fx.GraphModule] = []
    flow = nx.DiGraph()

    def backend(gm: fx.GraphModule, example_inputs):
        index = len(graphs)
        graphs.append(gm)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        sources, values, links, prefix = {}, {}, {}, ""
        for node, value in zip(placeholders, example_inputs):
            vid = id(value)
            if vid in named:
                sources[node.name] = named[vid]
                values[node.name] = value
                prefix = prefix or frame_prefix(node.name, named[vid][1])
            elif vid in inputs:
                sources[node.name] = ("input", inputs[vid])
            elif vid in produced:
                sources[node.name] = ("graph_input", None)
                links[node.name] = produced[vid]
            else:
                sources[node.name] = ("graph_input", None)
        keys = add_graph(flow, gm, index, index * 1_000_000, sources, values, prefix, _DYNAMO_SELF, inline=True)
        for name, producer in links.items():
            flow.add_edge(producer, keys[name])
        output = next(n for n in gm.graph.nodes if n.op == "output")
        out_nodes = [a for a in pytree.tree_leaves(output.args[0]) if isinstance(a, fx.Node)]

        def run(*args):
            result = gm.forward(*args)
            leaves = [x for x in pytree.tree_leaves(result)]
            for node, value in zip(out_nodes, leaves):
                if isinstance(value, torch.Tensor):
                    produced[id(value)] = keys[node.name]
                    keep_alive.append(value)
            return result

        return run

    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(capture_scalar_outputs=True), _quiet("torch._dynamo"):
            torch.compile(model, backend=backend, dynamic=False)(**kwargs)
    except Exception as exc:  # noqa: BLE001
        raise CaptureError(f"dynamo could not trace the model either: {type(exc).__name__}: {first_line(exc)}") from exc
    finally:
        torch._dynamo.reset()
    keep_alive.clear()
    return graphs, flow


def frame_prefix(placeholder: str, fqn: str) -> str:
    """Recover the module path of a dynamo frame's ``self`` from one parameter placeholder.

    A placeholder named ``l_self_modules_mlp_modules_fc1_parameters_weight_`` whose value *is* the
    parameter ``model.visual.blocks.0.mlp.fc1.weight`` means the frame's ``self`` is
    ``model.visual.blocks.0``. Returns "" when the name does not have that form.
    """
    parts = fqn.split(".")
    for cut in range(len(parts)):
        tail = parts[cut:]
        for kind in ("parameters", "buffers"):
            name = "".join(f"_modules_{p}" for p in tail[:-1]) + f"_{kind}_{tail[-1]}_"
            if placeholder == re.sub(r"[^0-9a-zA-Z_]", "_", "l_self" + name).lower():
                return ".".join(parts[:cut])
    return ""
