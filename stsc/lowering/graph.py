"""Graph lowering: the passes' rewrites as edits of the captured FX graph.

``transform(model, policy, example_inputs)`` exports the model with ``torch.export`` (the sequence length
dynamic: every input shaped like the token ids gets ``Dim.AUTO`` on dim 1), matches the exported graph, and
rewrites its graph module (``ep.module()``: the caller's own parameters, as attributes), pass by pass:

* **compress_visual_tokens** -- the decoder entry is a region of nodes (those the matcher's decoder-entry
  module ran). A ``stsc::compress_plan`` node (:mod:`stsc.lowering.ops`) is inserted on the merged sequence
  where it enters the region, reading the merge's own visual-position mask node, the token ids and a step
  buffer; every value entering the region whose shape has the sequence dimension goes through
  ``stsc::compact`` (hidden states, masks of any rank, position ids); inside the region the sequence length
  is redirected to the compacted one (``sym_size`` of the plan's index, and any size computed from it);
  every value leaving the region goes through ``stsc::expand``; runtime asserts inside the region about the
  old length are deleted, since the rewrite made them stale.
* **skip_layers** -- each skippable block's nodes are outlined into a submodule ``stsc_block_<i>`` and called as
  ``torch.cond(stsc_skip[i], stsc_identity_<i>, stsc_block_<i>, operands)``, with ``stsc_skip`` a bool buffer
  the runtime sets to a host tensor before each forward (read on the host: no device sync per block). Sizes the
  block reads are recomputed inside it from its hidden input (``torch.cond`` takes tensor operands only).

With the compression's ``dense_fraction`` > 0, the stage is lowered a second time without the compression (the
other passes applied): the forwards the runtime draws dense run that graph. Guarded blocks return their hidden
state flattened (and the caller views it back), because ``torch.cond`` cannot reason about the strides of a
compacted sequence's tensors (``Max(1, length - dropped)``).

After each pass the graph module is exported again, so its metadata (shapes, the ops' fake results) is
consistent and it can be saved with ``torch.export.save`` (the ops are registered when ``stsc`` is imported); the
programs take the model's tensor inputs by keyword, so a loaded one runs as ``program.module()(**batch)``.

:class:`GraphStage` runs the result: the same decisions as the module lowering for the same step (skip
patterns from :func:`stsc.schedules.draw_skips`, compression draws from the same seeded generator), so loss
and gradients agree with it. A skipped block's parameters receive zeros from ``torch.cond``'s backward; the
stage resets them to ``None`` when the block was skipped in every micro-batch of the step, which is the module
lowering's semantics (AdamW leaves such a block alone). In ``eval()`` the stage runs the caller's dense model.
What trains is ``GraphStage.training_module``: the same graph with each guarded block's ``torch.cond``
partitioned into a forward that saves the block's activations and a backward that reads them
(:mod:`stsc.lowering.saved_activations`); ``torch.cond``'s own backward would run the block's forward again.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.export import Dim

from stsc.capture import KeywordCall, exported_capture, first_line, forward_kwargs, module_paths
from stsc.errors import UnsupportedModelError, looking_for
from stsc.layout import images_in
from stsc.match import Structure, match
from stsc.passes.compress_visual_tokens import SELECTING, CompressVisualTokensConfig, forward_draws, kept_count
from stsc.passes.compress_visual_tokens import sequence_dims as aligned_dims
from stsc.passes.skip_layers import SkipLayersConfig
from stsc.policy import Policy, Stage, load_policy
from stsc.report import capture_and_match
from stsc.schedules import StepClock, draw_skips, layer_probabilities

from . import ops  # noqa: F401 - registers the stsc:: ops
from .saved_activations import keep_activations

__all__ = ["GraphLoweringUnavailable", "GraphRuntime", "GraphStage", "RewriteInfo", "compact_region", "graph_problem",
           "guard_blocks", "lower_stage", "transform"]


class GraphLoweringUnavailable(UnsupportedModelError):
    """The model or the stage cannot be lowered to a rewritten graph (the module lowering still works)."""


@dataclass
class RewriteInfo:
    """What a graph rewrite did: nodes added, removed, and uses redirected."""

    name: str
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    replaced: int = 0
    note: str = ""  # what else the rewrite means for the stage

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for name in self.added:
            kind = name.rstrip("0123456789").rstrip("_")
            kinds[kind] = kinds.get(kind, 0) + 1
        added = ", ".join(f"{count} {kind}" for kind, count in kinds.items())
        return (f"{self.name}: +{len(self.added)} nodes ({added or 'none'}), -{len(self.removed)} nodes, "
                f"{self.replaced} uses redirected" + (f", {self.note}" if self.note else ""))


# ------------------------------------------------------------------------------------------- shapes
def _val(node: fx.Node):
    """The (fake) value a node computes: ``val`` in exported graphs, ``example_value`` in dynamo's."""
    return node.meta.get("val", node.meta.get("example_value"))


def _expr(size):
    return size.node.expr if isinstance(size, torch.SymInt) else size


def _same(a, b) -> bool:
    """Two (possibly symbolic) sizes are the same expression (no guard is added)."""
    return _expr(a) == _expr(b)


def _depends_on(value, symbol) -> bool:
    return isinstance(value, torch.SymInt) and (_same(value, symbol) or _expr(symbol) in _expr(value).free_symbols)


def sequence_dims(value, batch, sequence) -> tuple[int, list[int]] | None:
    """``(batch_dim, dims)`` of a tensor aligned with the sequence (:func:`stsc.passes.compress_visual_tokens.
    sequence_dims`, with the (symbolic) ``sequence`` length); None when it is not aligned."""
    return aligned_dims(value.shape, batch, sequence, _same) if isinstance(value, torch.Tensor) else None


def module_region(gm: fx.GraphModule, path: str) -> list[fx.Node]:
    """The nodes module ``path`` ran, in order. A graph dynamo hands a backend names its frame's module
    ``L['self']``, whose path in the model the backend records as ``gm.meta["stsc_frame"]``."""
    frame = gm.meta.get("stsc_frame", "")
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")
            and path in module_paths(n, frame, frame_root="L['self']")]


# --------------------------------------------------------------------------- compress_visual_tokens
def compact_region(gm: fx.GraphModule, entry: str, hidden: fx.Node, visual: fx.Node, token_ids: fx.Node,
                   step: fx.Node, plan_args: tuple) -> RewriteInfo:
    """Compact everything entering the ``entry`` region of ``gm`` at the kept positions, expand what leaves it.

    ``step``: a node holding ``[step, micro step]`` (seeds the random draws); ``plan_args``: the other
    ``stsc::compress_plan`` arguments (method, keep_ratio, kernel, seed, grid, rows_layout, removed, dense_fraction,
    image_grids, grid_scale, padding).
    """
    info = RewriteInfo("compress_visual_tokens")
    graph = gm.graph
    region = module_region(gm, entry)
    inside = set(region)
    batch, sequence = _val(hidden).shape[:2]
    if not isinstance(sequence, torch.SymInt):
        raise GraphLoweringUnavailable("the exported graph specialized the sequence length to a constant")
    with graph.inserting_before(region[0]):
        plan = graph.call_function(torch.ops.stsc.compress_plan.default,
                                   (hidden, visual, token_ids, step, *plan_args))
        index = graph.call_function(operator.getitem, (plan, 0))
        restore = graph.call_function(operator.getitem, (plan, 1))
        length = graph.call_function(torch.ops.aten.sym_size.int, (index, 1))
    info.added += [step.name, plan.name, index.name, restore.name, length.name]
    new_nodes = {step, plan, index, restore, length}
    rebased: dict[fx.Node, fx.Node] = {}
    compacted: dict[fx.Node, fx.Node] = {}

    def rebase(node: fx.Node) -> fx.Node:
        """A symbolic size computed from the sequence length, recomputed from the compacted length."""
        if _same(_val(node), sequence):
            return length
        if node not in rebased:
            with graph.inserting_before(region[0]):
                rebased[node] = graph.node_copy(node, lambda arg: rebase(arg) if _depends_on(
                    _val(arg), sequence) else arg)
            info.added.append(rebased[node].name)
        return rebased[node]

    def compact(node: fx.Node) -> fx.Node | None:
        dims = sequence_dims(_val(node), batch, sequence)
        if dims is None:
            return None
        if node not in compacted:
            with graph.inserting_before(region[0]):
                compacted[node] = graph.call_function(torch.ops.stsc.compact.default, (node, index, *dims))
            info.added.append(compacted[node].name)
        return compacted[node]

    for node in region:
        for arg in list(node.all_input_nodes):
            if arg in inside or arg in new_nodes:
                continue
            new = rebase(arg) if _depends_on(_val(arg), sequence) else compact(arg)
            if new is not None:
                node.replace_input_with(arg, new)
                info.replaced += 1
    for node in region:
        outside = [user for user in node.users if user not in inside]
        if not outside:
            continue
        if sequence_dims(_val(node), batch, sequence) != (0, [1]):
            raise GraphLoweringUnavailable(f"the decoder entry's output {node.name} "
                                           f"{tuple(_val(node).shape)} cannot be expanded back to the sequence")
        with graph.inserting_after(node):
            expanded = graph.call_function(torch.ops.stsc.expand.default, (node, restore))
        info.added.append(expanded.name)
        for user in outside:
            user.replace_input_with(node, expanded)
            info.replaced += 1
    for node in region:  # runtime asserts about the old length are stale once it is compacted
        if node.target is torch.ops.aten._assert_scalar.default and any(
                _depends_on(_val(arg), sequence) for arg in node.all_input_nodes):
            info.removed.append(node.name)
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return info


def _compress_problem(structure: Structure, config: CompressVisualTokensConfig, inputs: dict) -> str | None:
    """Why the compression cannot be expressed in the graph (None when it can)."""
    b = structure.boundary
    if b is None or b.kind != "scatter" or b.positions is None:
        return (f"compression in the graph needs a scatter merge whose visual positions the matcher derived "
                f"(found: {b.kind + ' merge' if b else 'no boundary'})")
    if b.decoder_entry is None:
        return "the merging module calls the decoder blocks itself: there is no decoder-entry region to compact"
    if config.method not in SELECTING:
        return f"method {config.method!r} averages tokens; the graph compacts by selection ({', '.join(SELECTING)})"
    dropped = set(_dropped_per_row(b, config, inputs))
    if len(dropped) != 1:
        return (f"the example's rows drop different numbers of positions {sorted(dropped)}; the graph is built "
                f"for rows that all drop the same number")
    padding = inputs.get(b.padding_input) if b.padding_input else None
    if isinstance(padding, torch.Tensor) and bool((padding == 0).any(dim=1).all()):
        return ("every row of the example has padding: the graph keeps padding (its length is fixed when it is "
                "built) where the module lowering (sparsify) removes it")
    return None


def _dropped_per_row(boundary, config: CompressVisualTokensConfig, inputs: dict) -> list[int]:
    visual = boundary.positions(inputs)
    images = images_in(visual, inputs.get(boundary.token_input), boundary.rows_layout, boundary.image_grids(inputs),
                       boundary.grid)
    dropped = [0] * visual.shape[0]
    for image in images:
        dropped[image.row] += image.tokens - kept_count(image.tokens, config, image.grid)
    return dropped


def _lower_compress(gm, structure: Structure, config: CompressVisualTokensConfig, inputs: dict,
                    placeholders: dict[str, fx.Node], flags: Flags) -> RewriteInfo:
    problem = _compress_problem(structure, config, inputs)
    if problem:
        raise GraphLoweringUnavailable(problem)
    b = structure.boundary
    nodes = {node.name: node for node in gm.graph.nodes}
    node_of = lambda key: nodes[key.split(":", 1)[1]]  # noqa: E731 - data-flow key -> the node of gm
    grids = placeholders.get(b.grid_input) if b.grid_input else None
    if b.grid_input and grids is None:
        raise GraphLoweringUnavailable(f"the images' token grids come from the input {b.grid_input!r}, which this "
                                       f"graph does not take")
    plan_args = (config.method, config.keep_ratio, config.kernel, config.seed, list(b.grid or ()), b.rows_layout,
                 _dropped_per_row(b, config, inputs)[0], config.dense_fraction, grids, b.grid_scale or 1,
                 placeholders.get(b.padding_input))
    return compact_region(gm, b.decoder_entry, node_of(b.merge_node), node_of(b.positions.source),
                          placeholders[b.token_input], flags.step(gm), plan_args)


def graph_problem(capture_method: str, fallback_reason: str | None, structure: Structure, stage: Stage,
                  inputs: dict) -> str | None:
    """Why ``stage`` cannot be lowered to a rewritten graph of this model (None when it can), without exporting."""
    if capture_method != "export":
        return f"the model does not export ({fallback_reason})"
    problems = [_compress_problem(structure, entry.config, inputs) for entry in stage.passes
                if entry.name == "compress_visual_tokens"]
    return next((p for p in problems if p), None)


# -------------------------------------------------------------------------------------- skip_layers
def guard_blocks(gm: fx.GraphModule, paths: list[str], skippable: list[bool], skip: fx.Node
                 ) -> tuple[RewriteInfo, list[bool]]:
    """Outline each skippable block of ``gm`` and call it under ``torch.cond(skip[i], identity, block)``, ``skip``
    a node holding one bool per block.

    Returns what was done and which blocks were guarded: a block whose region has outputs besides its
    hidden state, or reads a size it cannot recompute from its hidden input, runs unguarded.
    """
    info = RewriteInfo("skip_layers", added=[skip.name])
    guarded = []
    for index, (path, allowed) in enumerate(zip(paths, skippable)):
        guarded.append(allowed and _guard_block(gm, index, path, skip, info))
    gm.graph.lint()
    gm.recompile()
    return info, guarded


def _guard_block(gm: fx.GraphModule, index: int, path: str, skip: fx.Node, info: RewriteInfo) -> bool:
    graph = gm.graph
    region = module_region(gm, path)
    sizes_from_outside = _size_arithmetic(region)
    region = [n for n in region if n not in sizes_from_outside]
    inside = set(region)
    outputs = [n for n in region if any(user not in inside for user in n.users)]
    inputs = list(dict.fromkeys(a for n in region for a in n.all_input_nodes if a not in inside))
    if len(outputs) != 1:
        return False
    shape = _val(outputs[0]).shape
    order = {n: i for i, n in enumerate(graph.nodes)}
    hiddens = [a for a in inputs if isinstance(_val(a), torch.Tensor)
               and len(_val(a).shape) == len(shape) and all(map(_same, _val(a).shape, shape))]
    if not hiddens:
        return False
    hidden = max(hiddens, key=order.get)
    tensors = [hidden] + [a for a in inputs if a is not hidden and isinstance(_val(a), torch.Tensor)]
    sizes = [a for a in inputs if not isinstance(_val(a), torch.Tensor)]
    block, env = fx.Graph(), {}
    for operand in tensors:
        env[operand] = block.placeholder(operand.name)
        env[operand].meta = dict(operand.meta)
    for size in sizes:  # torch.cond takes tensor operands only: recompute sizes from the hidden input
        dim = next((d for d, s in enumerate(_val(hidden).shape) if _same(s, _val(size))), None)
        if dim is None:
            return False
        env[size] = block.call_function(torch.ops.aten.sym_size.int, (env[hidden], dim))
    for node in region:
        env[node] = block.node_copy(node, env.__getitem__)
    # both branches return the hidden state flattened: torch.cond reasons about the strides of its outputs, and
    # those of a compacted sequence (``Max(1, length - dropped)``) it cannot
    block.output((block.call_function(torch.ops.aten.flatten.using_ints, (env[outputs[0]], 0, -1)),))
    identity = fx.Graph()
    placeholders = [identity.placeholder(operand.name) for operand in tensors]
    flat = identity.call_function(torch.ops.aten.flatten.using_ints, (placeholders[0], 0, -1))
    identity.output((identity.call_function(torch.ops.aten.clone.default, (flat,)),))
    gm.add_submodule(f"stsc_block_{index}", fx.GraphModule(gm, block))
    gm.add_submodule(f"stsc_identity_{index}", fx.GraphModule(gm, identity))
    with graph.inserting_before(region[0]):
        flag = graph.call_function(torch.ops.aten.select.int, (skip, 0, index))
        skip_branch = graph.get_attr(f"stsc_identity_{index}")
        run_branch = graph.get_attr(f"stsc_block_{index}")
        cond = graph.call_function(torch.ops.higher_order.cond, (flag, skip_branch, run_branch, tuple(tensors)))
        flat = graph.call_function(operator.getitem, (cond, 0))
        result = graph.call_function(torch.ops.aten.view_as.default, (flat, hidden))
    result.meta["val"] = _val(outputs[0])
    outputs[0].replace_all_uses_with(result)
    for node in reversed(region):
        graph.erase_node(node)
    info.added += [n.name for n in (flag, skip_branch, run_branch, cond, flat, result)]
    info.removed += [n.name for n in region]
    return True


def _size_arithmetic(region: list[fx.Node]) -> set[fx.Node]:
    """The nodes of ``region`` computing sizes from values outside it only: export places such arithmetic (e.g. a
    compacted length, from the input's) in the first module that reads it, though it belongs to no block."""
    inside, found = set(region), set()
    for node in region:
        if isinstance(_val(node), (int, torch.SymInt)) and all(a in found or a not in inside
                                                              for a in node.all_input_nodes):
            found.add(node)
    return found


def _lower_skip(gm, structure: Structure, config: SkipLayersConfig, inputs: dict, placeholders: dict[str, fx.Node],
                flags: Flags):
    paths = [b.path for b in structure.blocks]
    allowed = [config.may_skip(b) for b in structure.blocks]
    info, guarded = guard_blocks(gm, paths, allowed, flags.skip(gm, len(paths)))
    unguarded = [path.removeprefix("inner.") for path, may, done in zip(paths, allowed, guarded)
                 if may and not done and module_region(gm, path)]  # in this graph, yet not guarded
    if unguarded:  # the module lowering would skip them: the graph would draw other decisions
        raise GraphLoweringUnavailable(f"skip_layers: {', '.join(unguarded)} cannot run under torch.cond (a guarded "
                                       f"block returns only its hidden state and reads only sizes of it)")
    return info, guarded


class Flags:
    """Where a rewritten graph reads what the runtime fills before each forward: ``stsc_step`` (``[step,
    micro step]``) and ``stsc_skip`` (a bool per block), as buffers (an exported graph) or as extra trailing
    placeholders (a graph dynamo hands a backend: buffers would be baked in as constants)."""

    def __init__(self, as_inputs: bool):
        self.as_inputs = as_inputs
        self.names: list[str] = []  # the flags created, in order

    def step(self, gm: fx.GraphModule) -> fx.Node:
        return self._node(gm, "stsc_step", torch.zeros(2, dtype=torch.long))

    def skip(self, gm: fx.GraphModule, blocks: int) -> fx.Node:
        return self._node(gm, "stsc_skip", torch.zeros(blocks, dtype=torch.bool))

    def _node(self, gm: fx.GraphModule, name: str, value: torch.Tensor) -> fx.Node:
        self.names.append(name)
        last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
        with gm.graph.inserting_after(last):
            if self.as_inputs:
                node = gm.graph.placeholder(name)
                node.meta["example_value"] = value
                node._dynamo_source = None  # no user source: aot_autograd accepts that for a dynamo graph's input
                return node
            gm.register_buffer(name, value, persistent=False)
            return gm.graph.get_attr(name)


# ------------------------------------------------------------------------------------------ runtime
class GraphRuntime:
    """What a rewritten graph reads before each training forward, drawn as the module lowering draws it: the
    step (seeding the compression's random draws), the skip flags, and whether the forward is drawn dense
    (``last_dense``: the compression's ``dense_fraction``; such a forward runs the graph without the compression).
    It also gives a skipped block's parameters ``None`` gradients when the block was skipped in every micro-batch
    of the step (``torch.cond``'s backward gives zeros), the module lowering's semantics: AdamW leaves such a block
    alone."""

    def __init__(self, model: nn.Module, stage: Stage, guarded: list[bool], paths: list[str]):
        self.model, self.guarded, self.paths = model, guarded, paths
        self.skip: SkipLayersConfig | None = stage.pass_config("skip_layers")
        self.compress: CompressVisualTokensConfig | None = stage.pass_config("compress_visual_tokens")
        self.counts_steps = stage.unit == "steps"  # the schedule's progress is the step
        self.clock, self.progress = StepClock(), 0.0
        self.forced: list[int] | None = None
        self.last_skipped: list[int] = []
        self.last_dense = False
        self._skipped_all_step = [False] * len(paths)
        self._params = [list(model.get_submodule(path).parameters()) for path in paths]
        self._pending: list = []  # gradient hooks armed by the last forward, for the blocks it skipped

    def set_progress(self, *, epoch: float | None = None, step: int | None = None) -> None:
        """Move the schedule: ``epoch`` into the stage (fractional), ``step`` the global step (the progress too,
        for a stage counted in steps, as :meth:`stsc.SparseModel.set_progress` does for one stage)."""
        if epoch is not None and not self.counts_steps:
            self.progress = float(epoch)
        if step is not None:
            self.clock.set_step(step)
            if self.counts_steps:
                self.progress = float(step)

    def force(self, skipped: list[int] | None) -> None:
        """Skip exactly these blocks in every training forward (``None``: back to the schedule)."""
        self.forced = None if skipped is None else sorted(skipped)

    def probabilities(self) -> list[float]:
        return layer_probabilities(self.skip.skip_schedule(), len(self.paths), self.progress, self.guarded)

    def next_flags(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(step, skip)`` for this training forward: ``[step, micro step]`` and one flag per block; sets
        ``last_dense``; arms the gradient reset of the blocks it skips for the backward of this forward."""
        step, micro_step = self.clock.tick()
        self.last_dense = self.compress is not None and forward_draws(self.compress, step, micro_step)[0]
        skipped = []
        if self.skip is not None:
            skipped = self.forced if self.forced is not None else draw_skips(
                self.probabilities(), self.skip.seed, step, micro_step, self.skip.min_kept)
            self._skipped_all_step = [(i in skipped) and (micro_step == 0 or was)
                                      for i, was in enumerate(self._skipped_all_step)]
        self.last_skipped = skipped
        self._arm(skipped)
        return torch.tensor([step, micro_step]), torch.tensor([i in skipped for i in range(len(self.paths))])

    def _arm(self, skipped: list[int]) -> None:
        """One-shot hooks on the skipped blocks' parameters: after this forward's backward accumulates
        torch.cond's zeros, a block skipped in every micro-batch of the step gets ``None`` back."""
        for handle in self._pending:
            handle.remove()
        self._pending = []
        for block in skipped:
            for param in self._params[block]:
                handle = []

                def hook(param: torch.Tensor, block=block, handle=handle) -> None:
                    handle[0].remove()  # one shot: the next backward belongs to another forward
                    if self._skipped_all_step[block]:
                        param.grad = None  # the block did not run in this step
                handle.append(param.register_post_accumulate_grad_hook(hook))
                self._pending.append(handle[0])

    def remove(self) -> None:
        """Remove the gradient hooks still armed."""
        self._arm([])


class GraphStage(nn.Module):
    """One stage of a policy, lowered to a rewritten graph module that trains the caller's parameters.

    ``graph_module`` is the rewritten graph (its ``.code`` shows the inserted nodes: the compression ops,
    ``torch.cond`` per guarded block); ``exported`` the exported program of it (``torch.export.save``-able);
    ``training_module`` what trains: the same graph with each ``torch.cond`` partitioned so that a block's
    backward reads the activations its forward saved (``training_notes``: the blocks left as they were, and
    why); ``rewrites`` what each pass did; ``runtime`` the decisions (:class:`GraphRuntime`). With the
    compression's ``dense_fraction`` > 0, the forwards drawn dense run ``exported_dense`` (trained as
    ``dense_training_module``): the stage's graph without the compression, the other passes applied; otherwise
    it is None. ``forward`` takes the model's keyword inputs; ``set_progress`` and ``force`` move the schedule as
    :meth:`stsc.SparseModel.set_progress` does. In ``eval()`` it runs the caller's dense model.
    """

    def __init__(self, model: nn.Module, call: KeywordCall, stage: Stage, exported: torch.export.ExportedProgram,
                 rewrites: list[RewriteInfo], runtime: GraphRuntime,
                 exported_dense: torch.export.ExportedProgram | None = None):
        super().__init__()
        object.__setattr__(self, "graph_module", exported.module())  # for reading; training_module trains
        object.__setattr__(self, "dense", model)  # eval runs the caller's model; not a submodule (no second copy
        object.__setattr__(self, "call", call)  # of its parameters in state_dict); call orders the inputs
        self.stage, self.exported, self.exported_dense = stage, exported, exported_dense
        self.rewrites, self.runtime = rewrites, runtime
        self.set_progress, self.force = runtime.set_progress, runtime.force
        self._compile_kwargs: dict | None = None
        self._lower_for_training()

    def _lower_for_training(self) -> None:
        """The graphs that train: ``graph_module`` (and the dense forwards' graph) with each guarded block's
        ``torch.cond`` partitioned so that its backward reads the activations its forward saved
        (:mod:`stsc.lowering.saved_activations`), for the parameters that train now."""
        self.training_module = self.exported.module()
        self.training_notes = keep_activations(self.training_module)
        self.dense_training_module = None
        if self.exported_dense is not None:
            self.dense_training_module = self.exported_dense.module()
            self.training_notes += [f"in the dense forwards' graph: {note}"
                                    for note in keep_activations(self.dense_training_module)]
        self._trainable = self._trainable_now()
        self._prepare_runs()

    def _prepare_runs(self) -> None:
        """Per kind of forward (compressed or drawn dense): what runs it (compiled after :meth:`compile`) and the
        module whose flag buffers (``stsc_step``, ``stsc_skip``) are set before each forward."""
        self._runs = {}
        for dense, module in ((False, self.training_module), (True, self.dense_training_module)):
            if module is not None:
                run = module if self._compile_kwargs is None else torch.compile(module, **self._compile_kwargs)
                self._runs[dense] = run, module

    def _trainable_now(self) -> list[bool]:
        return [p.requires_grad for p in self.dense.parameters()]

    @property
    def last_skipped(self) -> list[int]:
        return self.runtime.last_skipped

    def train(self, mode: bool = True) -> GraphStage:
        """Switch between the rewritten graph (training) and the caller's dense model (eval, in eval mode); the
        graph module keeps the mode it was exported in."""
        self.training = mode
        self.dense.train(mode)
        return self

    def forward(self, **kwargs):
        if not self.training:
            return self.dense(**kwargs)
        if self._trainable_now() != self._trainable:
            self._lower_for_training()  # other parameters train now: the blocks' backwards are partitioned again
        step, skip = self.runtime.next_flags()
        run, module = self._runs[self.runtime.last_dense]
        for name, value in (("stsc_step", step), ("stsc_skip", skip)):
            if name in module._buffers:  # set, not copied into: the flags stay on the host wherever the stage is
                setattr(module, name, value)  # moved, so a torch.cond reads its flag without waiting for a GPU
        return run(**self.call.keywords(kwargs))

    def compile(self, **compile_kwargs) -> None:
        """``torch.compile`` the training graph: one graph serves every skip pattern and compression draw (and one
        more the forwards drawn dense)."""
        self._compile_kwargs = compile_kwargs
        self._prepare_runs()


GRAPH_LOWERINGS = {"compress_visual_tokens": _lower_compress, "skip_layers": _lower_skip}


def _dynamic(keywords: dict, token_shape: tuple) -> dict:
    """Dim.AUTO on dim 1 of every input shaped like the token ids (the sequence length), static elsewhere."""
    return {name: {1: Dim.AUTO} if tuple(v.shape) == token_shape else None for name, v in keywords.items()}


def lower_stage(model: nn.Module, stage: Stage, structure: Structure, inputs: dict) -> GraphStage:
    """Export ``model`` with a dynamic sequence length and rewrite its graph with ``stage``'s passes (and, when the
    compression leaves some forwards dense, a second graph without it). The programs take the model's tensor
    inputs by keyword."""
    with looking_for(f"stage {stage.name!r}: lowering its passes to a rewritten graph", GraphLoweringUnavailable):
        return _lower_stage(model, stage, structure, inputs)


def _lower_stage(model: nn.Module, stage: Stage, structure: Structure, inputs: dict) -> GraphStage:
    call = KeywordCall(model, forward_kwargs(model, inputs)[0])
    keywords = call.keywords(inputs)
    dynamic = _dynamic(keywords, tuple(inputs[structure.token_input].shape))
    exported = torch.export.export(call, (), keywords, dynamic_shapes=dynamic, strict=False)
    rewritten, rewrites, guarded = _rewrite_stage(exported, stage.passes, call, keywords, dynamic, inputs)
    compress, exported_dense = stage.pass_config("compress_visual_tokens"), None
    if compress is not None and compress.dense_fraction:
        passes = [entry for entry in stage.passes if entry.name != "compress_visual_tokens"]
        exported_dense = _rewrite_stage(exported, passes, call, keywords, dynamic, inputs)[0]
        rewrites[[r.name for r in rewrites].index("compress_visual_tokens")].note = dense_forwards_note(compress)
    runtime = GraphRuntime(model, stage, guarded, [b.path for b in structure.blocks])
    return GraphStage(model, call, stage, rewritten, rewrites, runtime, exported_dense)


def dense_forwards_note(config: CompressVisualTokensConfig) -> str:
    """What a compression's rewrite says of the forwards drawn dense (``dense_fraction``)."""
    return f"the forwards drawn dense (dense_fraction {config.dense_fraction:g}) run the graph without it"


def _rewrite_stage(exported: torch.export.ExportedProgram, passes, call: KeywordCall, keywords: dict, dynamic: dict,
                   inputs: dict) -> tuple[torch.export.ExportedProgram, list[RewriteInfo], list[bool]]:
    """``exported`` rewritten by ``passes``, exported again after each; what each did, and the guarded blocks."""
    rewrites, guarded = [], []
    for entry in passes:
        gm = exported.module()  # keyword inputs, placeholders in call.names order; module paths under "inner."
        exported_structure = match(exported_capture(exported, keywords, input_names=call.names))
        placeholders = dict(zip(call.names, (n for n in gm.graph.nodes if n.op == "placeholder")))
        result = GRAPH_LOWERINGS[entry.name](gm, exported_structure, entry.config, inputs, placeholders,
                                             Flags(as_inputs=False))
        info, guarded = result if entry.name == "skip_layers" else (result, guarded)
        rewrites.append(info)
        try:
            exported = torch.export.export(gm, (), keywords, dynamic_shapes=dynamic, strict=False)
        except Exception as exc:  # noqa: BLE001
            raise GraphLoweringUnavailable(f"the rewritten graph does not export again: {type(exc).__name__}: "
                                           f"{first_line(exc)}") from exc
    return exported, rewrites, guarded


def transform(model: nn.Module, policy: Policy | str, example_inputs: dict, stage: str | None = None
              ) -> dict[str, GraphStage]:
    """Each stage of ``policy`` (or only ``stage``) lowered to a rewritten, exported graph of ``model``.

    Raises :class:`GraphLoweringUnavailable` with the reason when the model does not export or a pass cannot be
    expressed in its graph (use :func:`stsc.sparsify`, the module lowering, then).
    """
    policy = load_policy(policy)
    structure, report = capture_and_match(model, example_inputs)
    if report.capture_method != "export":
        raise GraphLoweringUnavailable(f"the model does not export ({report.fallback_reason})")
    stages = [policy.stage(stage)] if stage is not None else list(policy.stages)
    return {s.name: lower_stage(model, s, structure, example_inputs) for s in stages}
