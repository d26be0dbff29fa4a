"""``torch.compile(model, backend=stsc.backend(model, policy, example_inputs, stage=...))``: the graph lowering
applied to the graphs dynamo hands a backend, which then delegates to a compiler (``inductor`` by default).

Each graph is matched again (its placeholders identified by the tensors dynamo passes for them: the model's
parameters and the call's inputs) and rewritten as :mod:`stsc.lowering.graph` rewrites an exported graph,
for one stage of the policy: ``torch.cond`` around each decoder block the graph holds, and the compression of
the decoder-entry region when the merge and the decoder are in the same graph. The runtime values (the step,
the skip flags) are extra trailing inputs of the rewritten graph, filled once per model forward (a hook on
the model), so every skip pattern runs the same compiled code. With the compression's ``dense_fraction``, each
graph is also compiled as it is, for the forwards drawn dense (the module lowering's draw). A stage that both
compresses and skips is refused (the compression needs dynamic shapes, under which ``torch.cond`` cannot take
the compacted sequence): :func:`stsc.transform` lowers it. What was done with each graph, or why it was
left as it was (a graph without the blocks, a graph compiled for eval, a model compiled without
``dynamic=True`` for the compression, ...), is in :attr:`CompileBackend.graphs`; the model is never broken
silently. A stage is fixed per backend: compile the model again with another backend for the next stage.
"""

from __future__ import annotations

import dataclasses

import networkx as nx
import torch
from torch import fx, nn

from stsc.capture import Capture, add_graph, forward_kwargs, frame_prefix
from stsc.match import match
from stsc.policy import Policy, load_policy
from stsc.report import capture_and_match

from .graph import GRAPH_LOWERINGS, Flags, GraphLoweringUnavailable, GraphRuntime, dense_forwards_note, module_region

__all__ = ["CompileBackend", "backend"]

_DYNAMO_SELF = "L['self']"


class CompileBackend:
    """A ``torch.compile`` backend that rewrites the graphs of ``model`` for ``stage`` of ``policy``."""

    def __init__(self, model: nn.Module, policy: Policy | str, example_inputs: dict, stage: str | None = None,
                 compiler: str = "inductor"):
        policy = load_policy(policy)
        stages = [policy.stage(stage)] if stage is not None else [s for s in policy.stages if s.passes]
        if len(stages) != 1:
            raise ValueError(f"a compile backend rewrites for one stage; name it with stage= "
                             f"({', '.join(s.name for s in policy.stages)})")
        self.stage, self.model, self.compiler = stages[0], model, compiler
        if {"compress_visual_tokens", "skip_layers"} <= {entry.name for entry in self.stage.passes}:
            raise ValueError(f"stage {self.stage.name!r} compresses visual tokens and skips blocks: the compile "
                             f"backend does one of them per stage (the compression needs dynamic shapes, under which "
                             f"torch.cond cannot take the compacted sequence); use stsc.transform(...) and "
                             f"GraphStage.compile(), or sparsify(...) and torch.compile")
        self.inputs = forward_kwargs(model, example_inputs)[0]
        self.structure = capture_and_match(model, example_inputs)[0]
        skip = self.stage.pass_config("skip_layers")
        blocks = self.structure.blocks
        guarded = [skip.may_skip(b) for b in blocks] if skip else []
        self.runtime = GraphRuntime(model, self.stage, guarded, [b.path for b in blocks])
        self.set_progress, self.force = self.runtime.set_progress, self.runtime.force
        self.graphs: list[str] = []  # per graph dynamo handed over: what was rewritten, or why not
        self._call: dict = {}
        self._flags: dict[str, torch.Tensor] = {}
        self._hook = model.register_forward_pre_hook(self._read_call, with_kwargs=True)

    def remove(self) -> None:
        """Detach from the model (its forward hook): before compiling the model with another backend."""
        self._hook.remove()
        self.runtime.remove()

    @torch.compiler.disable
    def _read_call(self, module, args, kwargs):
        """Once per model forward: the call's inputs (to identify placeholders) and this forward's flags."""
        self._call = kwargs
        if module.training:
            step, skip = self.runtime.next_flags()
            self._flags = {"stsc_step": step, "stsc_skip": skip}

    def __call__(self, gm: fx.GraphModule, example_inputs: list):
        inner = torch._dynamo.lookup_backend(self.compiler)
        if not (self.model.training and torch.is_grad_enabled()):
            self.graphs.append("left as it is: compiled for eval or without gradients (the dense model)")
            return inner(gm, example_inputs)
        flags = Flags(as_inputs=True)
        rewritten = _copy(gm)  # dynamo keeps reading the graph it handed over: rewrite a copy
        try:
            rewrites = self._rewrite(rewritten, example_inputs, flags)
        except GraphLoweringUnavailable as exc:
            self.graphs.append(f"left as it is: {exc}")
            return inner(gm, example_inputs)
        names = [n.target for n in rewritten.graph.nodes if n.op == "placeholder"][len(example_inputs):]
        compiled = inner(rewritten, [*example_inputs, *(self._flags[name] for name in names)])
        dense = None
        compress = self.runtime.compress
        if compress is not None and compress.dense_fraction:  # the stage's one pass; dense forwards skip it
            dense = inner(gm, example_inputs)
            rewrites[0].note = dense_forwards_note(compress)
        self.graphs.append("; ".join(r.summary() for r in rewrites))

        def run(*args):
            if dense is not None and self.runtime.last_dense:
                return dense(*args)
            return compiled(*args, *(self._flags[name] for name in names))

        return run

    def _rewrite(self, gm: fx.GraphModule, example_inputs: list, flags: Flags) -> list:
        """The stage's passes applied to ``gm``: the blocks are the model's (found at creation; those this graph
        runs get guarded), the merge and its visual positions are found in ``gm`` itself."""
        found, placeholders = self._match(gm, example_inputs)
        merge = found.boundary is not None
        if not any(module_region(gm, block.path) for block in self.structure.blocks):
            raise GraphLoweringUnavailable("this graph holds no decoder blocks" + (
                " but the merge: a graph break puts the merge and the decoder in different graphs" if merge else ""))
        known = self.structure.boundary  # what this graph alone cannot show: the entry module, the images' grid
        boundary = merge and dataclasses.replace(found.boundary, decoder_entry=known.decoder_entry, grid=known.grid,
                                                 rows_layout=known.rows_layout, grid_input=known.grid_input,
                                                 grid_scale=known.grid_scale)
        structure = dataclasses.replace(self.structure, boundary=boundary or None)
        rewrites = []
        for entry in self.stage.passes:
            if entry.name == "compress_visual_tokens" and not merge:
                raise GraphLoweringUnavailable("this graph holds the decoder blocks but not the merge: a graph break "
                                               "puts the merge and the decoder in different graphs")
            result = GRAPH_LOWERINGS[entry.name](gm, structure, entry.config, self.inputs, placeholders, flags)
            rewrites.append(result[0] if isinstance(result, tuple) else result)
        return rewrites

    def _match(self, gm: fx.GraphModule, example_inputs: list):
        """Match dynamo's graph (its placeholders are the model's parameters and buffers and the call's inputs,
        identified by the very tensors dynamo passes for them); the structure and the input placeholders."""
        named = {id(t): ("param", name) for name, t in self.model.named_parameters()}
        named.update({id(t): ("buffer", name) for name, t in self.model.named_buffers()})
        named.update({id(t): ("input", name) for name, t in self._call.items() if isinstance(t, torch.Tensor)})
        sources, values, inputs, frame = {}, {}, {}, ""
        for node, value in zip([n for n in gm.graph.nodes if n.op == "placeholder"], example_inputs):
            sources[node.name] = named.get(id(value), ("graph_input", None))
            if sources[node.name][0] in ("param", "buffer"):
                values[node.name] = value
                frame = frame or frame_prefix(node.name, sources[node.name][1])
            elif sources[node.name][0] == "input":
                inputs[sources[node.name][1]] = node
        gm.meta["stsc_frame"] = frame  # the model path of the frame dynamo traced (its `self`)
        flow = nx.DiGraph()
        add_graph(flow, gm, 0, 0, sources, values, frame, _DYNAMO_SELF)
        return match(Capture("dynamo", [gm], flow, self.inputs, 0.0)), inputs


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of a dynamo graph module with what aot_autograd reads off it (its meta, parameter sources, and each
    placeholder's source)."""
    graph, env = fx.Graph(), {}
    graph.output(graph.graph_copy(gm.graph, env))
    copy = fx.GraphModule(gm, graph)
    copy.meta = dict(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copy._param_name_to_source = gm._param_name_to_source
    for old, new in env.items():
        if old.op == "placeholder":
            new._dynamo_source = getattr(old, "_dynamo_source", None)
    return copy


def backend(model: nn.Module, policy: Policy | str, example_inputs: dict, stage: str | None = None,
            compiler: str = "inductor") -> CompileBackend:
    """A ``torch.compile`` backend applying ``stage`` of ``policy`` to the graphs of ``model``; see the module
    docstring. Move its schedule with ``backend.set_progress(epoch=..., step=...)``."""
    return CompileBackend(model, policy, example_inputs, stage, compiler)
