"""Match: find a multimodal LLM's structure in its captured data flow, by structure alone.

No class names, attribute names or model families are consulted: only the graph (ops, shapes, dtypes,
data dependencies), the module hierarchy recorded on each node, and the example input values.

**Token stream and pixels.** The token input is the integer model input that indexes an
``embedding`` lookup. Pixel inputs are the floating-point model inputs.

**Boundary.** Every node is tainted by what it depends on (pixels, tokens). The first floating-point
node that depends on both is where visual features meet the token stream. Its op classifies it:
``masked_scatter`` / ``index_put`` / ``where``-like ops write features into placeholder positions
(``scatter``); ``cat`` concatenates them with text embeddings (``concat``); attention ops take them
as keys/values (``cross_attention``). Walking back from the pixel-only operand through pure data
movement (views, casts, concatenation) gives the visual-token tensor and the module producing it.

**Blocks.** Sibling modules (children of one module in the call hierarchy) that run one after the
other, each consuming the previous one's output, and whose op graphs hash alike (networkx
Weisfeiler-Lehman) form a stack. Runs may mix kinds (self- and cross-attention layers in one list):
members of a kind seen once are kept when they sit inside the run. The decoder stack is the stack on
the token stream covering the most nodes; stacks fed only by pixels are vision stacks. A block is a
residual block (it reads its hidden input at least twice), which rules out chains of plain layers
(two projector linears) and stacks nested inside another stack's blocks are not reported.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from math import prod

import networkx as nx
import torch
from torch import fx

from .capture import Capture

__all__ = ["Block", "Boundary", "Structure", "match", "placeholder_runs"]

PIXELS, TOKENS = 1, 2

# ops that move or re-type data without computing new values
DATA_MOVEMENT_OPS = frozenset({
    "view", "reshape", "_unsafe_view", "to", "_to_copy", "type", "type_as", "float", "half", "bfloat16",
    "expand", "expand_as", "flatten", "unflatten", "squeeze", "unsqueeze", "permute", "transpose", "t",
    "contiguous", "clone", "alias", "detach", "getitem", "select", "slice", "split", "split_with_sizes",
    "chunk", "unbind", "cat", "concat", "stack", "narrow", "view_as", "repeat", "lift_fresh_copy",
})
LIKE_OPS = frozenset({"type_as", "expand_as", "view_as", "reshape_as", "to"})  # second operand: a template
SCATTER_OPS = frozenset({"masked_scatter", "masked_scatter_", "index_put", "index_put_", "scatter", "scatter_",
                         "index_copy", "index_copy_", "where", "setitem", "masked_fill"})
CONCAT_OPS = frozenset({"cat", "concat", "concatenate"})
ATTENTION_OPS = frozenset({"scaled_dot_product_attention", "matmul", "bmm", "baddbmm", "einsum",
                           "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                           "flex_attention"})
CONV_OPS = frozenset({"conv2d", "convolution", "_convolution"})
PLACEHOLDER_OPS = frozenset({"input", "param", "buffer", "constant", "graph_input"})


@dataclass
class Block:
    path: str  # module path, e.g. "model.language_model.layers.3"
    kind: int  # index of this block's shape among the stack's distinct shapes (0 = first seen)
    hidden_in: str  # data-flow key of the hidden state entering the block
    hidden_out: str  # data-flow key of the hidden state leaving it
    nodes: int


@dataclass
class Boundary:
    kind: str  # "scatter" | "concat" | "cross_attention" | "other"
    merge_node: str  # data-flow key where pixel-derived values meet the token stream
    merge_op: str
    visual_tokens: str  # data-flow key of the visual-token tensor
    visual_shape: tuple | None
    producer_module: str | None  # the module whose output is the visual-token tensor
    tokens_per_image: int | None
    images: int | None
    grid: tuple[int, int] | None
    placeholder_id: int | None
    token_input: str
    token_embedding: str | None  # module path of the embedding lookup the token input indexes
    vision_inputs: list[str]
    aligned_inputs: list[str]


@dataclass
class Structure:
    blocks: list[Block]
    block_kinds: int
    vision_blocks: list[str]
    boundary: Boundary | None
    token_input: str | None
    notes: list[str] = field(default_factory=list)  # what was looked for and not found
    hidden_shape: tuple[int, ...] | None = None  # the hidden state entering the first decoder block

    @property
    def batch(self) -> int | None:
        return self.hidden_shape[0] if self.hidden_shape and len(self.hidden_shape) == 3 else None


def match(cap: Capture) -> Structure:
    flow = cap.dataflow
    order = sorted(flow.nodes, key=lambda k: flow.nodes[k]["order"])
    notes: list[str] = []
    token_input, token_embedding = _token_input(flow, order)
    vision_inputs = list(dict.fromkeys(flow.nodes[k]["source"] for k in order
                                       if flow.nodes[k]["op"] == "input" and _is_float(flow, k)))
    taint = _taint(flow, order, token_input, vision_inputs)
    if token_input is None:
        notes.append("no token input: looked for an integer model input that indexes an embedding lookup")
    stacks = _stacks(flow, order)
    decoder = [s for s in stacks if any(taint[b.hidden_out] & TOKENS for b in s)]
    vision = [b.path for s in stacks if all(taint[b.hidden_out] == PIXELS for b in s) for b in s]
    blocks = max(decoder, key=lambda s: sum(b.nodes for b in s), default=[])
    if not blocks:
        notes.append("no decoder blocks found: looked for sibling modules that run one after another on the "
                     "token stream, each consuming the previous one's output, with alike op graphs")
    boundary = None
    if token_input is not None and vision_inputs:
        boundary = _boundary(cap, flow, order, taint, token_input, token_embedding, vision_inputs,
                             [b.path for b in blocks], notes)
    elif token_input is not None:
        notes.append("no vision boundary found: the model has no floating-point input (pixels) besides tokens")
    hidden_shape = tuple(flow.nodes[blocks[0].hidden_in].get("shape") or ()) if blocks else None
    return Structure(blocks, len({b.kind for b in blocks}), vision, boundary, token_input, notes, hidden_shape or None)


# ------------------------------------------------------------------------------ inputs and taint
def _is_float(flow: nx.DiGraph, key: str) -> bool:
    dtype = flow.nodes[key]["dtype"]
    return dtype is not None and dtype.is_floating_point


def _walk_back_data_movement(flow: nx.DiGraph, key: str) -> str:
    """From ``key``, step back over data-movement ops (and graph-break links) to the computing node.

    The data is the largest tensor operand, except for ``x.type_as(y)``-like ops, whose second
    operand only lends its dtype or shape: there it is ``x``.
    """
    while flow.nodes[key]["op"] in DATA_MOVEMENT_OPS | {"graph_input"}:
        preds = [p for p in flow.predecessors(key) if flow.nodes[p]["op"] not in ("param", "buffer", "constant")]
        if not preds:
            break
        node = flow.nodes[key]["fx"]
        first = (f"{key.split(':', 1)[0]}:{node.args[0].name}"
                 if flow.nodes[key]["op"] in LIKE_OPS and node.args and isinstance(node.args[0], fx.Node) else None)
        key = first if first in preds else max(preds, key=lambda p: prod(_numel_shape(flow.nodes[p]["shape"] or (0,))))
    return key


def _numel_shape(shape: tuple) -> list[int]:
    return [s if isinstance(s, int) else 1 for s in shape]


def _token_input(flow: nx.DiGraph, order: list[str]) -> tuple[str | None, str | None]:
    """The integer model input that indexes the largest embedding table (the vocabulary), and the
    module path of that embedding lookup.

    Other integer inputs may index small tables too (aspect-ratio ids, say); the vocabulary is the
    largest table a model input indexes.
    """
    best, best_module, best_rows = None, None, -1
    for key in order:
        if flow.nodes[key]["op"] != "embedding":
            continue
        preds = list(flow.predecessors(key))
        tables = [flow.nodes[p]["shape"] for p in preds if _is_float(flow, p) and flow.nodes[p]["shape"]]
        rows = max((t[0] for t in tables if isinstance(t[0], int)), default=0)
        for pred in preds:
            dtype = flow.nodes[pred]["dtype"]
            if dtype is not None and not dtype.is_floating_point:
                origin = _walk_back_data_movement(flow, pred)
                if flow.nodes[origin]["op"] == "input" and rows > best_rows:
                    modules = flow.nodes[key]["module"]
                    best, best_module, best_rows = flow.nodes[origin]["source"], modules[-1] if modules else None, rows
    return best, best_module


def _taint(flow, order, token_input, vision_inputs) -> dict[str, int]:
    taint = {}
    for key in order:
        node = flow.nodes[key]
        bits = 0
        if node["op"] == "input":
            bits = TOKENS if node["source"] == token_input else PIXELS if node["source"] in vision_inputs else 0
        for pred in flow.predecessors(key):
            bits |= taint[pred]
        taint[key] = bits
    return taint


# ------------------------------------------------------------------------------------- boundary
def _boundary(cap, flow, order, taint, token_input, token_embedding, vision_inputs, block_paths,
              notes) -> Boundary | None:
    merge = next((k for k in order if taint[k] == PIXELS | TOKENS and _is_float(flow, k)
                  and flow.nodes[k]["op"] not in PLACEHOLDER_OPS and len(flow.nodes[k]["shape"] or ()) >= 2), None)
    if merge is None:
        notes.append(f"no vision boundary found: no floating-point node depends on both the pixel inputs "
                     f"{vision_inputs} and the token input '{token_input}'")
        return None
    op = flow.nodes[merge]["op"]
    kind = ("concat" if op in CONCAT_OPS else "scatter" if op in SCATTER_OPS
            else "cross_attention" if op in ATTENTION_OPS else "other")
    pixel_operands = [p for p in flow.predecessors(merge) if taint[p] == PIXELS and flow.nodes[p]["shape"]]
    operand = max(pixel_operands, key=lambda p: prod(_numel_shape(flow.nodes[p]["shape"])))
    visual = _visual_tokens(flow, operand, _enclosing(flow.nodes[merge]["module"], block_paths))
    shape = flow.nodes[visual]["shape"]
    placeholder = _placeholder_id(flow, merge, token_input) if kind == "scatter" else None
    tokens_per_image, images = _tokens_per_image(cap, token_input, placeholder, shape, notes)
    grid = _grid(flow, order, taint, tokens_per_image)
    token_shape = tuple(cap.example_inputs[token_input].shape)
    aligned = [name for name, value in cap.example_inputs.items()
               if isinstance(value, torch.Tensor) and tuple(value.shape) == token_shape]
    return Boundary(kind, merge, op, visual, shape, _producer_module(flow, visual, merge), tokens_per_image,
                    images, grid, placeholder, token_input, token_embedding,
                    vision_inputs, aligned)


def _enclosing(modules: tuple[str, ...], block_paths: list[str]) -> str | None:
    return next((path for path in modules if path in block_paths), None)


def _visual_tokens(flow: nx.DiGraph, operand: str, merging_block: str | None) -> str:
    """Walk back from the pixel-only operand of the merge to the node that computes visual tokens.

    Data movement is skipped, and so is what the merging decoder block computes from the visual
    tokens itself (a cross-attention layer's key/value projections): the visual tokens enter it.
    """
    key = _walk_back_data_movement(flow, operand)
    while merging_block and _enclosing(flow.nodes[key]["module"], [merging_block]):
        preds = [p for p in flow.predecessors(key) if _is_float(flow, p) and flow.nodes[p]["op"] != "param"]
        if not preds:
            break
        key = _walk_back_data_movement(flow, max(preds, key=lambda p: prod(_numel_shape(flow.nodes[p]["shape"] or ()))))
    return key


def _producer_module(flow: nx.DiGraph, visual: str, merge: str) -> str | None:
    """The outermost module whose last node is the visual-token node and that does not do the merge."""
    members = defaultdict(list)
    for _, data in flow.nodes(data=True):
        for path in data["module"]:
            members[path].append(data["order"])
    merge_modules = set(flow.nodes[merge]["module"])
    for path in flow.nodes[visual]["module"]:
        if path not in merge_modules and max(members[path]) == flow.nodes[visual]["order"]:
            return path
    modules = flow.nodes[visual]["module"]
    return modules[-1] if modules else None


def _placeholder_id(flow: nx.DiGraph, merge: str, token_input: str) -> int | None:
    """The token id compared against the token input to build the merge's position mask."""
    seen, frontier = set(), [p for p in flow.predecessors(merge) if not _is_float(flow, p)]
    while frontier:
        key = frontier.pop()
        if key in seen:
            continue
        seen.add(key)
        node = flow.nodes[key]
        if node["op"] in ("eq", "__eq__"):
            constants = [a for a in node["fx"].args if isinstance(a, int) and not isinstance(a, bool)]
            if constants:
                return constants[0]
        frontier.extend(p for p in flow.predecessors(key) if flow.nodes[p]["op"] not in ("param", "buffer"))
    return None


def placeholder_runs(values: torch.Tensor, token: int) -> list[tuple[int, int, int]]:
    """``(row, start, length)`` of every run of ``token`` in the rows of a ``[batch, seq]`` tensor."""
    runs = []
    for row, items in enumerate(values.tolist()):
        start = None
        for position, value in enumerate(items + [None]):
            if value == token and start is None:
                start = position
            elif value != token and start is not None:
                runs.append((row, start, position - start))
                start = None
    return runs


def _tokens_per_image(cap, token_input, placeholder, shape, notes) -> tuple[int | None, int | None]:
    token_values = cap.example_inputs[token_input]
    if placeholder is not None and token_values.device.type != "meta":
        runs = [length for _, _, length in placeholder_runs(token_values, placeholder)]
        if runs and len(set(runs)) == 1:
            return runs[0], len(runs)
        notes.append(f"placeholder token {placeholder} appears in runs of unequal lengths {runs}: "
                     f"visual tokens per image differ between images")
        return None, len(runs)
    if shape and len(shape) >= 3 and all(isinstance(s, int) for s in shape):
        return prod(shape[1:-1]), shape[0]
    notes.append(f"visual tokens per image not derivable from the visual-token tensor of shape {shape}")
    return None, None


def _grid(flow, order, taint, tokens_per_image) -> tuple[int, int] | None:
    """The 2-D token grid, when a pixel-side convolution produces exactly that many positions."""
    if tokens_per_image is None:
        return None
    for key in order:
        node = flow.nodes[key]
        if node["op"] in CONV_OPS and taint[key] == PIXELS and node["shape"] and len(node["shape"]) == 4:
            height, width = node["shape"][-2:]
            if isinstance(height, int) and isinstance(width, int) and height * width == tokens_per_image:
                return height, width
    return None


# --------------------------------------------------------------------------------------- blocks
def _stacks(flow: nx.DiGraph, order: list[str]) -> list[list[Block]]:
    members: dict[str, list[str]] = defaultdict(list)
    children: dict[str, list[str]] = defaultdict(list)
    for key in order:
        modules = ("",) + flow.nodes[key]["module"]
        for parent, child in zip(modules, modules[1:]):
            if child not in children[parent]:
                children[parent].append(child)
        for path in modules[1:]:
            members[path].append(key)
    stacks = [stack for parent, kids in children.items() if len(kids) >= 2
              for stack in _runs_of_blocks(flow, kids, members)]
    outer = {b.path for stack in stacks for b in stack}
    return [stack for stack in stacks
            if not any(stack[0].path.startswith(path + ".") for path in outer)]


def _runs_of_blocks(flow, kids, members) -> list[list[Block]]:
    owner = {key: kid for kid in kids for key in members[kid]}
    kids = sorted(kids, key=lambda k: flow.nodes[members[k][0]]["order"])
    runs, current = [], [kids[0]]
    for prev, nxt in zip(kids, kids[1:]):
        if nxt in _fed_siblings(flow, prev, members[prev], owner):
            current.append(nxt)
        else:
            runs.append(current)
            current = [nxt]
    runs.append(current)
    stacks = []
    for run in runs:
        hashes = {kid: _shape_hash(flow, members[kid]) for kid in run}
        counts = defaultdict(int)
        for h in hashes.values():
            counts[h] += 1
        while run and counts[hashes[run[0]]] < 2:
            run = run[1:]
        while run and counts[hashes[run[-1]]] < 2:
            run = run[:-1]
        blocks = _blocks(flow, run, members, hashes) if len(run) >= 2 else []
        if blocks and all(_is_residual(flow, b, members[b.path]) for b in blocks):
            stacks.append(blocks)
    return stacks


def _is_residual(flow: nx.DiGraph, block: Block, nodes: list[str]) -> bool:
    """A block reads its hidden input at least twice: once to transform it, once to add it back."""
    inside = set(nodes)
    return sum(1 for s in flow.successors(block.hidden_in) if s in inside) >= 2


def _fed_siblings(flow, kid, nodes, owner, limit=64) -> set[str]:
    """Siblings reached from ``kid``'s outputs through nodes of no sibling (glue), within ``limit``."""
    inside = set(nodes)
    frontier = [s for n in nodes for s in flow.successors(n) if s not in inside]
    reached, seen = set(), set()
    while frontier and len(seen) < limit:
        key = frontier.pop()
        if key in seen:
            continue
        seen.add(key)
        if key in owner:
            if owner[key] != kid:
                reached.add(owner[key])
            continue
        frontier.extend(flow.successors(key))
    return reached


def _shape_hash(flow: nx.DiGraph, nodes: list[str]) -> str:
    sub = nx.DiGraph()
    for key in nodes:
        sub.add_node(key, op=flow.nodes[key]["op"])
    sub.add_edges_from(flow.subgraph(nodes).edges)
    with warnings.catch_warnings():  # networkx notes that directed hashes changed in 3.5; we only compare
        warnings.simplefilter("ignore", UserWarning)
        return nx.weisfeiler_lehman_graph_hash(sub, node_attr="op", iterations=3)


def _blocks(flow, run, members, hashes) -> list[Block]:
    kinds: dict[str, int] = {}
    blocks = []
    hidden_in = None
    for kid in run:
        nodes = members[kid]
        inside = set(nodes)
        outs = [n for n in nodes if _is_float(flow, n) and any(s not in inside for s in flow.successors(n))]
        hidden_out = max(outs, key=lambda n: flow.nodes[n]["order"]) if outs else nodes[-1]
        if hidden_in is None:
            shape = flow.nodes[hidden_out]["shape"]
            entering = [p for n in nodes for p in flow.predecessors(n)
                        if p not in inside and flow.nodes[p]["shape"] == shape and _is_float(flow, p)]
            hidden_in = max(entering, key=lambda n: flow.nodes[n]["order"]) if entering else nodes[0]
        kind = kinds.setdefault(hashes[kid], len(kinds))
        blocks.append(Block(kid, kind, hidden_in, hidden_out, len(nodes)))
        hidden_in = hidden_out
    return blocks
