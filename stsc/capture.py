"""Capture: trace a model into torch.fx graph(s) with PyTorch's own machinery.

``capture(model, example_inputs)`` first tries ``torch.export.export(..., strict=False)``: one aten
graph with ``nn_module_stack`` on every node. Where export fails (data-dependent shapes, say), it falls
back to dynamo (``torch.compile`` with a collecting backend), which never fails outright but may split
the model into several graphs at graph breaks. Either way the result is a :class:`Capture` holding the
graphs and one :class:`networkx.DiGraph` of the data flow across all of them, which is what the matcher
reads. Nodes of that data-flow graph are keyed ``"g<graph>:<node name>"`` and carry:

``op``       canonical op name: ``"linear"``, ``"masked_scatter"``, ... (aten overload packet or
             torch function / method name); placeholders are ``"input"``, ``"param"``, ``"buffer"``,
             ``"constant"`` or ``"graph_input"`` (a value produced by an earlier graph).
``module``   tuple of module paths from outermost to innermost (root excluded), fully qualified
             from the top-level model even for dynamo graphs of inner frames.
``shape``    tuple of ints (symbolic sizes as strings) or None; ``dtype``: torch dtype or None.
``source``   for placeholders: the user input name or the parameter / buffer path.
``order``    position in execution order across all graphs.

Graphs are traced on the model as given: parameters on the ``meta`` device are fine for export (no
weights materialized); the example inputs are moved to the parameters' device for the trace.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import time
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.utils._pytree as pytree
from torch import fx, nn

__all__ = ["Capture", "CaptureError", "capture", "forward_kwargs"]


class CaptureError(RuntimeError):
    """Neither torch.export nor dynamo could trace the model with the given inputs."""


@dataclass
class Capture:
    method: str  # "export" or "dynamo"
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
    """Trace ``model(**example_inputs)``: torch.export first, dynamo where export fails."""
    kwargs, notes = forward_kwargs(model, example_inputs)
    kwargs = _to_model_device(model, kwargs)
    start = time.perf_counter()
    try:
        exported = _export(model, kwargs)
    except TypeError as exc:
        if "use_cache" not in str(exc) or "use_cache" not in kwargs:
            raise
        kwargs, notes = {k: v for k, v in kwargs.items() if k != "use_cache"}, []
        exported = _export(model, kwargs)
    if not isinstance(exported, Exception):
        return Capture("export", [exported.graph_module], _export_dataflow(exported), example_inputs,
                       time.perf_counter() - start, None, notes, exported)
    reason = f"torch.export failed: {type(exported).__name__}: {first_line(exported)}"
    graphs, flow = _dynamo_capture(model, kwargs)
    return Capture("dynamo", graphs, flow, example_inputs, time.perf_counter() - start, reason, notes)


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
def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


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


def _module_paths(node: fx.Node, prefix: str = "", frame_root: str = "") -> tuple[str, ...]:
    stack = node.meta.get("nn_module_stack") or {}
    paths = []
    for path, _cls in stack.values():
        if frame_root and path.startswith(frame_root):
            path = path[len(frame_root):].lstrip(".")
        path = ".".join(p for p in (prefix, path) if p)
        if path and path not in paths:
            paths.append(path)
    return tuple(paths)


def _add_graph(flow: nx.DiGraph, gm: fx.GraphModule, index: int, order_base: int, sources: dict,
               prefix: str = "", frame_root: str = "") -> dict[str, str]:
    """Add one graph's nodes and edges to ``flow``; return fx node name -> data-flow key."""
    keys = {}
    for position, node in enumerate(gm.graph.nodes):
        key = f"g{index}:{node.name}"
        keys[node.name] = key
        shape, dtype = _shape_dtype(node)
        kind, source = sources.get(node.name, (None, None)) if node.op == "placeholder" else (None, None)
        flow.add_node(key, fx=node, graph=index, op=kind or op_name(node), source=source,
                      module=_module_paths(node, prefix, frame_root), shape=shape, dtype=dtype,
                      order=order_base + position)
        for arg in node.all_input_nodes:
            flow.add_edge(keys[arg.name], key)
    return keys


def _export_dataflow(exported: torch.export.ExportedProgram) -> nx.DiGraph:
    sig = exported.graph_signature
    sources = {name: ("param", fqn) for name, fqn in sig.inputs_to_parameters.items()}
    sources.update({name: ("buffer", fqn) for name, fqn in sig.inputs_to_buffers.items()})
    sources.update({name: ("constant", fqn) for name, fqn in sig.inputs_to_lifted_tensor_constants.items()})
    sources.update({name: ("input", name) for name in sig.user_inputs if isinstance(name, str)})
    flow = nx.DiGraph()
    _add_graph(flow, exported.graph_module, 0, 0, sources)
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
        sources, links, prefix = {}, {}, ""
        for node, value in zip(placeholders, example_inputs):
            vid = id(value)
            if vid in named:
                sources[node.name] = named[vid]
                prefix = prefix or _frame_prefix(node.name, named[vid][1])
            elif vid in inputs:
                sources[node.name] = ("input", inputs[vid])
            elif vid in produced:
                sources[node.name] = ("graph_input", None)
                links[node.name] = produced[vid]
            else:
                sources[node.name] = ("graph_input", None)
        keys = _add_graph(flow, gm, index, index * 1_000_000, sources, prefix, _DYNAMO_SELF)
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


def _frame_prefix(placeholder: str, fqn: str) -> str:
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
