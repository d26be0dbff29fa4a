"""Match: find a multimodal LLM's structure in its captured data flow, by structure alone.

No class names, attribute names or model families are consulted: only the graph (ops, shapes, dtypes,
data dependencies), the module hierarchy recorded on each node, and the example input values.

**Token stream and pixels.** The token input is the integer model input that indexes an
``embedding`` lookup, through data movement and the masking that rewrites ids before it (placeholder
ids replaced by a pad id, ids clamped, a quantized image's codes written at the placeholders). Pixel inputs are
the floating-point model inputs. Without a token input, the integer inputs stand for the token stream (blocks are
still found).

**Boundary.** Every node is tainted by what it depends on (pixels, tokens). The first floating-point
node that depends on both, and on the embeddings the token input looks up, is where visual features meet the token
stream (a value computed from the ids alone, such as time or position embeddings derived from the placeholder runs,
may modulate the features before that without being the merge). Its op classifies it:
``masked_scatter`` / ``index_put`` / ``where``-like ops write features into placeholder positions
(``scatter``); ``cat`` concatenates them with text embeddings (``concat``); attention ops take them
as keys/values (``cross_attention``); an ``embedding`` lookup of ids into which ids computed from the pixels (VQ
codes) were written merges before embedding: a ``scatter`` at the write's positions. An additive merge computes
``sequence[positions] + features`` and writes it back: the write is the merge, its pixel-only operand found through
the sum. Walking back from the pixel-only operand through pure data movement (views, casts, concatenation) gives the
visual-token tensor and the module producing it.
Where the visual tokens sit in the merged sequence is sliced out of the graph as a small program over
the model inputs (:mod:`stsc.positions`); on the example inputs it gives the images and their token
counts (:mod:`stsc.layout`). The **decoder entry** is the outermost module that runs every decoder
block but not the merge: its forward receives the merged sequence (where every such module merges,
e.g. adding features before several blocks, the outermost one that receives the sequence and not the
computation of the visual tokens).

**Padding mask.** The model input that marks padding, where the merged sequence is aligned with the token
input: an integer or bool input shaped like the token input, read by the model, whose example values are 0/1
with a 1 at every visual position (images are never padding) and, in each row, zeros only as one run at the
start or the end (left or right padding; none at all is the usual example). Token-type inputs fail this (zeros
at visual positions, or on both sides of an image). Where several inputs qualify, the one that reaches an
attention op; where that does not single one out, none (the compactor then keeps padding, as without a mask).

**Blocks.** Sibling modules (children of one module in the call hierarchy) that run one after the
other, each consuming the previous one's output, form a stack. A block's **kind** is the shapes of
the parameters it reads (its op graph's Weisfeiler-Lehman hash when it reads none): robust to values
a model computes lazily in whichever layer first needs them. Runs may mix kinds (self- and
cross-attention layers, dense and mixture-of-experts layers, attention and convolution layers): a
member of a kind seen once is kept when it sits inside the run, or at its end when it is numbered in
a list holding another of the run's blocks (every block of a short decoder may differ: dense and MoE MLPs, own and
shared keys and values, rotary embedding or none); where the others are numbered in a list, a
member at an end that is not is no block even when its kind repeats (a final read-out and a norm after the layers,
each reading one weight of the hidden width). A module called between two items of a list, fed by the first while
the first also feeds the second (a side module of a loop that runs some blocks more than once, reading a previous
pass's states), neither ends the run nor is a block. The decoder stack is the stack on
the token stream covering the most nodes; stacks fed only by pixels are vision stacks. A block is a
residual block (it reads its hidden input at least twice), which rules out chains of plain layers
(two projector linears) and stacks nested inside another stack's blocks are not reported.
"""

from __future__ import annotations

import warnings
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from math import prod

import networkx as nx
import torch
from torch import fx

from .capture import Capture
from .errors import looking_for
from .layout import images_in, metadata_grids, metadata_scale, pictures_in
from .positions import PositionProgram, Slots, position_program, slots

__all__ = ["Block", "Boundary", "Structure", "match"]

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
POOL_OPS = frozenset({"avg_pool2d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d", "max_pool2d",
                      "max_pool2d_with_indices", "interpolate", "upsample_bilinear2d", "upsample_nearest2d"})
RESHAPE_OPS = frozenset({"view", "reshape", "_unsafe_view", "permute", "pixel_shuffle", "pixel_unshuffle"})
PLACEHOLDER_OPS = frozenset({"input", "param", "buffer", "constant", "graph_input"})
# ops that rewrite token ids before a lookup (placeholder ids replaced by a pad id, ids clamped into the table, the
# codes of a quantized image written at the placeholders: ids merged, then embedded)
ID_MASKING_OPS = frozenset({"where", "masked_fill", "masked_fill_", "clamp", "clamp_", "clamp_min", "clamp_max",
                            "clip", "minimum", "maximum", "index_put", "index_put_", "masked_scatter"})

# what each step of the matcher looks for (the notes, and the errors when a step fails, say it)
TOKEN_INPUT = "an integer model input that indexes an embedding lookup"
DECODER_BLOCKS = ("sibling modules that run one after another on the token stream, each consuming the previous "
                  "one's output, with alike op graphs")
VISION_BOUNDARY = "where values computed from the pixel inputs meet the token stream"


@dataclass
class Block:
    path: str  # module path, e.g. "decoder.layers.3"
    kind: int  # index of this block's shape among the stack's distinct shapes (0 = first seen)
    hidden_in: str  # data-flow key of the hidden state entering the block
    hidden_out: str  # data-flow key of the hidden state leaving it
    nodes: int
    feeds: tuple[int, ...] = ()  # later blocks reading a value it computes besides its hidden output
    side_values: tuple = ()  # (shape, dtype) of each such value
    # blocks of another stack reading a value it computes besides its hidden output (an action expert's layer
    # attending to its keys and values): skipped together with it
    partners: tuple[str, ...] = ()


@dataclass
class Boundary:
    kind: str  # "scatter" | "concat" | "cross_attention" | "other"
    merge_node: str  # data-flow key where pixel-derived values meet the token stream
    merge_op: str
    merged_shape: tuple  # the merged sequence [batch, seq, hidden] the merge produces
    visual_tokens: str  # data-flow key of the visual-token tensor
    visual_shape: tuple | None
    producer_module: str | None  # the module whose output is the visual-token tensor
    tokens_per_image: int | list[int] | None  # a list when the example's images differ
    images: int | None
    grid: tuple[int, int] | None  # of every single-run image, from a patch convolution
    placeholder_id: int | None
    token_input: str
    token_embedding: str | None  # module path of the embedding lookup the token input indexes
    vision_inputs: list[str]
    positions: PositionProgram | Slots | None = None  # where the visual tokens sit in the merged sequence
    rows_layout: bool = False  # an image is a chain of rows separated by break tokens (stsc.layout)
    decoder_entry: str | None = None  # the module whose forward receives the merged sequence
    grid_input: str | None = None  # a model input holding each image's [.., height, width], e.g. in patches
    grid_scale: int | None = None  # ... divided by which each row gives the image's token grid
    # (row, first position, last position, views) of each picture, where the layout says its images are views of
    # one picture (a global view plus slices, each opened by its marker: stsc.layout.pictures_in); else None
    picture_views: list[tuple[int, int, int, int]] | None = None
    padding_input: str | None = None  # the model input marking padding positions with 0 (see the module docstring)
    # images back to back in one run (no token between them), each this many tokens, the tower's count per image
    cut: int | None = None

    def image_grids(self, inputs: dict) -> list[tuple[int, int]]:
        """The grid of each image of a batch, in order, from the per-image metadata input (if found)."""
        values = inputs.get(self.grid_input) if self.grid_input else None
        return metadata_grids(values, self.grid_scale) if isinstance(values, torch.Tensor) else []


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
    with looking_for(f"match: looking for the token input ({TOKEN_INPUT})"):
        token_input, token_embedding = _token_input(flow, order)
    inputs = list(dict.fromkeys(flow.nodes[k]["source"] for k in order if flow.nodes[k]["op"] == "input"))
    vision_inputs = [name for name in inputs if _is_float(flow, _input_node(flow, order, name))]
    if token_input is None:
        notes.append(f"no token input: looked for {TOKEN_INPUT}")
    # without a token input, the integer inputs stand for the token stream: blocks are still found
    token_stream = [token_input] if token_input is not None else [
        name for name in inputs if name not in vision_inputs and flow.nodes[_input_node(flow, order, name)]["dtype"]
        not in (None, torch.bool)]
    taint = _taint(flow, order, token_stream, vision_inputs)
    with looking_for(f"match: looking for the decoder blocks ({DECODER_BLOCKS})"):
        stacks = _stacks(flow, order)
    decoder = [s for s in stacks if any(taint[b.hidden_out] & TOKENS for b in s)]
    vision_stacks = [s for s in stacks if all(taint[b.hidden_out] == PIXELS for b in s)]
    vision = [b.path for s in vision_stacks for b in s]
    vision_end = max((flow.nodes[s[-1].hidden_out]["order"] for s in vision_stacks), default=-1)
    # the token stream enters a decoder's first block; a second stack that only reads the decoder's keys and values
    # (an action expert) carries tokens at its output alone
    fed = [s for s in decoder if taint[s[0].hidden_in] & TOKENS]
    blocks = max(fed or decoder, key=lambda s: sum(b.nodes for b in s), default=[])
    if not blocks:
        notes.append(f"no decoder blocks found: looked for {DECODER_BLOCKS}")
    _find_partners(flow, order, blocks, [b for s in stacks if s is not blocks for b in s])
    boundary = None
    if token_input is not None and vision_inputs:
        with looking_for(f"match: looking for the vision boundary ({VISION_BOUNDARY})"):
            boundary = _boundary(cap, flow, order, taint, token_input, token_embedding, vision_inputs, blocks,
                                 vision_end, notes)
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


def _largest(flow: nx.DiGraph, keys) -> str:
    return max(keys, key=lambda k: prod(_numel_shape(flow.nodes[k]["shape"] or ())))


def _input_node(flow: nx.DiGraph, order: list[str], name: str) -> str:
    return next(k for k in order if flow.nodes[k]["op"] == "input" and flow.nodes[k]["source"] == name)


def _is_ids(flow: nx.DiGraph, key: str) -> bool:
    dtype = flow.nodes[key]["dtype"]
    return dtype is not None and not dtype.is_floating_point and dtype is not torch.bool


def _ids_source(flow: nx.DiGraph, key: str) -> str:
    """From an embedding lookup's index, step back over data movement and over the masking that rewrites ids
    before a lookup (``where(is_image, pad_id, ids)``, ``clamp``...), to where the ids come from: through a
    masking op the ids are its largest integer (not boolean) operand."""
    while True:
        key = _walk_back_data_movement(flow, key)
        ids = [p for p in flow.predecessors(key) if _is_ids(flow, p)]
        if flow.nodes[key]["op"] not in ID_MASKING_OPS or not ids:
            return key
        key = _largest(flow, ids)


def _token_input(flow: nx.DiGraph, order: list[str]) -> tuple[str | None, str | None]:
    """The integer model input that indexes the largest embedding table (the vocabulary), and the
    module path of that embedding lookup.

    Other integer inputs may index small tables too (aspect-ratio ids, say); the vocabulary is the
    largest table a model input indexes. The ids may be rewritten on the way (:func:`_ids_source`).
    """
    best, best_module, best_rows = None, None, -1
    for key in order:
        if flow.nodes[key]["op"] != "embedding":
            continue
        preds = list(flow.predecessors(key))
        tables = [flow.nodes[p]["shape"] for p in preds if _is_float(flow, p) and flow.nodes[p]["shape"]]
        rows = max((t[0] for t in tables if isinstance(t[0], int)), default=0)
        for pred in preds:
            if _is_ids(flow, pred):
                origin = _ids_source(flow, pred)
                if flow.nodes[origin]["op"] == "input" and rows > best_rows:
                    modules = flow.nodes[key]["module"]
                    best, best_module, best_rows = flow.nodes[origin]["source"], modules[-1] if modules else None, rows
    return best, best_module


def _taint(flow, order, token_stream: list[str], vision_inputs) -> dict[str, int]:
    taint = {}
    for key in order:
        node = flow.nodes[key]
        bits = 0
        if node["op"] == "input":
            bits = TOKENS if node["source"] in token_stream else PIXELS if node["source"] in vision_inputs else 0
        for pred in flow.predecessors(key):
            bits |= taint[pred]
        taint[key] = bits
    return taint


# ------------------------------------------------------------------------------------- boundary
def _boundary(cap, flow, order, taint, token_input, token_embedding, vision_inputs, blocks: list[Block],
              vision_end: int, notes) -> Boundary | None:
    embedded = _embedded(flow, token_input)
    merge = next((k for k in order if taint[k] == PIXELS | TOKENS and k in embedded and _is_float(flow, k)
                  and flow.nodes[k]["op"] not in PLACEHOLDER_OPS and len(flow.nodes[k]["shape"] or ()) >= 2), None)
    if merge is None:
        notes.append(f"no vision boundary found: no floating-point node depends on both the pixel inputs "
                     f"{vision_inputs} and the embeddings of the token input '{token_input}'")
        return None
    merge = _written_back(flow, taint, merge)
    op = flow.nodes[merge]["op"]
    kind = ("concat" if op in CONCAT_OPS else "scatter" if op in SCATTER_OPS or _looks_up_merged_ids(flow, merge)
            else "cross_attention" if op in ATTENTION_OPS else "other")
    block_paths = [b.path for b in blocks]
    operand = _pixel_operand(flow, taint, merge)
    if operand is None:
        notes.append(f"no vision boundary found: the first node that depends on both the pixel inputs and the token "
                     f"input ({op} at {merge}) reads no value computed from the pixels alone")
        return None
    visual = _visual_tokens(flow, operand, _enclosing(flow.nodes[merge]["module"], block_paths))
    shape = flow.nodes[visual]["shape"]
    placeholder = _placeholder_id(flow, merge, token_input) if kind == "scatter" else None
    with looking_for("match: looking for the visual positions of the merged sequence"):
        positions = _positions(cap, flow, merge, kind, operand, token_input, notes)
    with looking_for("match: looking for the images of the example inputs at those positions"):
        tokens_per_image, images, rows_layout, grid_input, scale, views, cut = _images(cap, flow, merge, positions,
                                                                                       token_input, shape, notes)
    grid = _grid(flow, taint, visual, tokens_per_image, vision_end)
    padding = _padding_input(cap, flow, token_input, positions, notes) if kind != "cross_attention" else None
    return Boundary(kind, merge, op, tuple(flow.nodes[merge]["shape"]), visual, shape,
                    _producer_module(flow, visual, merge), tokens_per_image,
                    images, grid, placeholder, token_input, token_embedding, vision_inputs, positions, rows_layout,
                    _decoder_entry(flow, merge, visual, blocks), grid_input, scale, views, padding, cut)


def _looks_up_merged_ids(flow: nx.DiGraph, merge: str) -> bool:
    """An embedding lookup of ids into which ids computed from the pixels (a VQ codebook's codes) were written at the
    placeholders: the ids are merged, then embedded, so the lookup's output is the merged sequence, a scatter merge
    whose positions are the write's."""
    return flow.nodes[merge]["op"] == "embedding" and any(
        _is_ids(flow, p) and flow.nodes[_walk_back_data_movement(flow, p)]["op"] in SCATTER_OPS
        for p in flow.predecessors(merge))


def _embedded(flow: nx.DiGraph, token_input: str) -> set[str]:
    """The nodes that depend on an embedding lookup the token input indexes (through data movement and id masking,
    :func:`_ids_source`), the lookups included."""
    lookups = [k for k in flow.nodes if flow.nodes[k]["op"] == "embedding" and any(
        _is_ids(flow, p) and flow.nodes[origin := _ids_source(flow, p)]["op"] == "input"
        and flow.nodes[origin]["source"] == token_input for p in flow.predecessors(k))]
    return set(lookups).union(*(nx.descendants(flow, k) for k in lookups))


def _written_back(flow, taint, merge: str) -> str:
    """An additive merge computes ``sequence[positions] + features`` (the first node that depends on both pixels and
    tokens) and writes it back into the sequence (``masked_scatter``, ``index_put``...): that write, reached through
    data movement, is the merge. Any other first meeting point is the merge itself."""
    if flow.nodes[merge]["op"] in SCATTER_OPS | CONCAT_OPS | ATTENTION_OPS:
        return merge
    key = merge
    while True:
        users = [s for s in flow.successors(key) if taint[s] == PIXELS | TOKENS]
        writes = [s for s in users if flow.nodes[s]["op"] in SCATTER_OPS]
        if writes:
            return min(writes, key=lambda s: flow.nodes[s]["order"])
        moved = [s for s in users if flow.nodes[s]["op"] in DATA_MOVEMENT_OPS]
        if len(moved) != 1:
            return merge
        key = moved[0]


def _pixel_operand(flow, taint, merge: str) -> str | None:
    """The largest value computed from the pixels alone that the merge reads: an operand of its own, or, for an
    additive merge (``sequence[positions] + features`` written back), an operand of what it reads from both
    (breadth first). None when there is none (the meeting happened out of sight, e.g. inside an opaque call)."""
    frontier, seen = [merge], {merge}
    while frontier:
        preds = [p for key in frontier for p in flow.predecessors(key) if p not in seen]
        seen.update(preds)
        pixels = [p for p in preds if taint[p] == PIXELS and flow.nodes[p]["shape"]]
        if pixels:
            return _largest(flow, pixels)
        frontier = [p for p in preds if taint[p] == PIXELS | TOKENS]
    return None


def _positions(cap, flow, merge, kind, operand, token_input, notes) -> PositionProgram | Slots | None:
    """How to find the visual positions of the merged sequence for any batch (see :mod:`stsc.positions`)."""
    if kind == "concat":
        found = slots(flow, merge, operand)
        if found is None:
            notes.append("visual positions: the concatenated visual tokens do not have a static size")
        return found
    if kind not in ("scatter", "other"):
        return None
    token_shape = next(flow.nodes[k]["shape"] for k in flow if flow.nodes[k]["op"] == "input"
                       and flow.nodes[k]["source"] == token_input)  # symbolic sizes when exported dynamic
    program, why = position_program(flow, merge, tuple(token_shape))
    merged = flow.nodes[merge]["shape"]
    if program is None and kind == "other" and flow.nodes[operand]["shape"] == merged:
        why = (f"the visual features are added onto every position of the merged sequence (both {list(merged)}): "
               f"no position holds visual tokens alone")
    if program is None:
        notes.append(f"visual positions: {why}")
    return program


def _images(cap, flow, merge, positions, token_input, shape, notes):
    """Visual tokens per image (a list when they differ), images in the example, whether images are laid out
    as rows separated by break tokens (:mod:`stsc.layout`), the per-image grid metadata input and scale, the
    span of each picture whose images are views of it (None unless the layout groups views into pictures), and the
    tokens of each of the images that sit back to back in one run (None unless they do)."""
    token_values = cap.example_inputs[token_input]
    static = shape and len(shape) >= 3 and all(isinstance(s, int) for s in shape)
    if positions is None or token_values.device.type == "meta":
        if static:
            return prod(shape[1:-1]), shape[0], False, None, None, None, None
        notes.append(f"visual tokens per image not derivable from the visual-token tensor of shape {shape}")
        return None, None, False, None, None, None, None
    if isinstance(positions, Slots):
        merged = flow.nodes[merge]["shape"]
        mask = positions.mask(merged[0], merged[1])
    else:
        mask = positions(cap.example_inputs)
    single_runs = images_in(mask)
    rows = images_in(mask, token_values, rows_layout=True)
    rows_layout = len(rows) < len(single_runs) and not (static and shape[0] == len(single_runs))  # unless the
    # vision side itself counts one image per run
    images = rows if rows_layout else single_runs
    tokens = sum(image.tokens for image in single_runs)
    # the tower gives more images than there are runs, and the runs hold its tokens per image a whole number of times
    cut = shape[1] if static and len(shape) == 3 and not rows_layout and shape[0] > len(single_runs) \
        and tokens == shape[0] * shape[1] and all(image.tokens % shape[1] == 0 for image in single_runs) else None
    if cut:
        images = images_in(mask, cut=cut)
    counts = [image.tokens for image in images]
    if not counts:
        notes.append("visual positions: the example inputs hold no visual token")
        return None, 0, rows_layout, None, None, None, None
    pictures = pictures_in(images, token_values)
    views = [(p[0].row, p[0].positions[0], p[-1].positions[-1], len(p)) for p in pictures] \
        if len(pictures) < len(images) else None
    grid_input, scale = next(((name, scale) for name, value in cap.example_inputs.items()
                              if isinstance(value, torch.Tensor) and name != token_input
                              and (scale := metadata_scale(value, counts)) is not None), (None, None))
    return (counts[0] if len(set(counts)) == 1 else counts), len(counts), rows_layout, grid_input, scale, views, cut


def _padding_input(cap, flow, token_input, positions, notes) -> str | None:
    """The model input marking padding (see the module docstring); None, with a note saying why, when none is."""
    tokens = cap.example_inputs[token_input]
    visual = positions(cap.example_inputs) if isinstance(positions, PositionProgram) else None
    if visual is None or tokens.device.type == "meta":
        notes.append("padding mask: looked for only where the visual positions are computed from the token input "
                     "(the merged sequence aligned with it); padding stays in the compacted sequence")
        return None
    candidates = [key for key in flow if flow.nodes[key]["op"] == "input" and flow.nodes[key]["source"] != token_input
                  and any(True for _ in flow.successors(key))
                  and _marks_padding(cap.example_inputs.get(flow.nodes[key]["source"]), tokens.shape, visual)]
    if len(candidates) > 1:
        candidates = [key for key in candidates if any(flow.nodes[k]["op"] in ATTENTION_OPS
                                                       for k in nx.descendants(flow, key))]
    names = sorted({flow.nodes[key]["source"] for key in candidates})
    if len(names) == 1:
        return names[0]
    notes.append(f"padding mask: {'several inputs qualify (' + ', '.join(names) + ')' if names else 'none found'}; "
                 f"looked for an integer 0/1 model input shaped like the token input, 1 at every visual position, "
                 f"zeros only at one end of a row; padding stays in the compacted sequence")
    return None


def _marks_padding(value, shape, visual: torch.Tensor) -> bool:
    """``value`` could be a padding mask of a batch shaped ``shape`` whose visual positions are ``visual``."""
    if not isinstance(value, torch.Tensor) or value.shape != shape or value.is_floating_point() or value.is_complex():
        return False
    real = value.long()
    if not bool(((real == 0) | (real == 1)).all()) or not bool(real[visual.to(real.device)].all()):
        return False
    for row in real.bool().tolist():
        ones = [i for i, one in enumerate(row) if one]
        if not ones or (ones[0] > 0 and ones[-1] < len(row) - 1) or len(ones) != ones[-1] - ones[0] + 1:
            return False  # no real position, zeros on both sides, or zeros inside
    return True


def _decoder_entry(flow, merge, visual, blocks: list[Block]) -> str | None:
    """The outermost module that runs every decoder block but not the merge: its forward receives the
    merged sequence. Where every such module merges (it writes or adds the visual tokens into the sequence
    itself, before one block or several), the outermost one that receives a sequence of the merged shape and
    does not compute the visual tokens: they reach its forward as arguments, with the sequence and the positions
    they go to, so all three are compacted alike there. None when neither exists (the merging module calls the
    blocks itself)."""
    if not blocks:
        return None
    around = []  # the modules around every block, outermost first
    for path in flow.nodes[blocks[0].hidden_out]["module"]:
        if path == blocks[0].path:
            break
        if all(b.path.startswith(path + ".") for b in blocks):
            around.append(path)
    merging, computing = set(flow.nodes[merge]["module"]), set(flow.nodes[visual]["module"])
    return next((path for path in around if path not in merging), None) or next(
        (path for path in around if path not in computing and _receives(flow, path, flow.nodes[merge]["shape"])),
        None)


def _receives(flow, path: str, shape) -> bool:
    """Whether module ``path`` reads a floating-point value of ``shape`` computed outside it (an argument)."""
    return any(path in flow.nodes[reader]["module"] and path not in flow.nodes[key]["module"] and _is_float(flow, key)
               and flow.nodes[key]["shape"] == shape for key, reader in flow.edges)


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
    """The token id compared against the token input to build the merge's position mask: the comparison nearest the
    merge (breadth first): not the markers of spans the mask excludes, nor the other placeholder ids (video, audio) a
    model may compare before the lookup."""
    seen, frontier = set(), deque(p for p in flow.predecessors(merge) if not _is_float(flow, p))
    while frontier:
        key = frontier.popleft()
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


def _grid(flow, taint, visual: str, tokens_per_image, vision_end: int) -> tuple[int, int] | None:
    """The 2-D token grid of every image: the visual-token tensor's own ``[images, rows, cols, D]`` shape,
    else the last pixel-side layout before it with exactly that many positions: a convolution or pooling
    output ``[n, C, rows, cols]``, or, after the vision blocks (``vision_end``: order of the last one's
    output), a reshape to ``[n, rows, cols, C]`` (a pixel shuffle in the connector, say)."""
    if not isinstance(tokens_per_image, int):
        return None

    def spatial(rows, cols):
        return isinstance(rows, int) and isinstance(cols, int) and rows > 1 and cols > 1 \
            and rows * cols == tokens_per_image

    shape = flow.nodes[visual]["shape"] or ()
    if len(shape) == 4 and spatial(shape[1], shape[2]):
        return shape[1], shape[2]
    for key in sorted(nx.ancestors(flow, visual) | {visual}, key=lambda k: flow.nodes[k]["order"], reverse=True):
        node = flow.nodes[key]
        shape = node["shape"] or ()
        if taint[key] != PIXELS or len(shape) != 4:
            continue
        if node["op"] in CONV_OPS | POOL_OPS and spatial(shape[2], shape[3]):
            return shape[2], shape[3]
        if node["op"] in RESHAPE_OPS and node["order"] > vision_end and spatial(shape[1], shape[2]):
            return shape[1], shape[2]
    return None


# --------------------------------------------------------------------------------------- blocks
def _members(flow: nx.DiGraph, order: list[str]) -> dict[str, list[str]]:
    """Each module path's data-flow keys, in order."""
    members: dict[str, list[str]] = defaultdict(list)
    for key in order:
        for path in flow.nodes[key]["module"]:
            members[path].append(key)
    return members


def _stacks(flow: nx.DiGraph, order: list[str]) -> list[list[Block]]:
    members = _members(flow, order)
    children: dict[str, list[str]] = defaultdict(list)
    for key in order:
        modules = ("",) + flow.nodes[key]["module"]
        for parent, child in zip(modules, modules[1:]):
            if child not in children[parent]:
                children[parent].append(child)
    stacks = [stack for parent, kids in children.items() if len(kids) >= 2
              for stack in _runs_of_blocks(flow, kids, members)]
    outer = {b.path for stack in stacks for b in stack}
    return [stack for stack in stacks
            if not any(stack[0].path.startswith(path + ".") for path in outer)]


def _runs_of_blocks(flow, kids, members) -> list[list[Block]]:
    owner = {key: kid for kid in kids for key in members[kid]}
    kids = sorted(kids, key=lambda k: flow.nodes[members[k][0]]["order"])
    runs, current, rest = [], [kids[0]], kids[1:]
    while rest:
        prev = current[-1]
        fed = _fed_siblings(flow, prev, members[prev], owner)
        rest = _past_side_modules(prev, rest, fed)
        nxt = rest.pop(0)
        if nxt in fed:
            current.append(nxt)
        else:
            runs.append(current)
            current = [nxt]
    runs.append(current)
    stacks = []
    for run in runs:
        hashes = {kid: _kind_key(flow, members[kid]) for kid in run}
        counts = defaultdict(int)
        for h in hashes.values():
            counts[h] += 1
        # a list holding two of the run's blocks is the stack: its items stay at the ends whatever their kind (the
        # blocks of a short decoder may all differ)
        items = {path for path, n in Counter(map(_container, run)).items() if n >= 2} - {None}

        def stray(kid):  # at an end of the run: not an item of the list, and of a kind seen once or beside a list
            return _container(kid) not in items and (counts[hashes[kid]] < 2 or bool(items))

        while run and stray(run[0]):
            run = run[1:]
        while run and stray(run[-1]):
            run = run[:-1]
        blocks = _blocks(flow, run, members, hashes) if len(run) >= 2 else []
        if blocks and all(_is_residual(flow, b, members[b.path]) for b in blocks):
            stacks.append(blocks)
    return stacks


def _past_side_modules(prev: str, rest: list[str], fed: set[str]) -> list[str]:
    """``rest`` (the siblings after ``prev``, in call order) from the next item of ``prev``'s list on, where ``prev``
    feeds that item and only siblings outside the list are first called before it: side modules a loop over the list
    calls between two items (one reading a previous pass's states for looped blocks, say) are not blocks."""
    items = [i for i, kid in enumerate(rest) if _container(prev) is not None and _container(kid) == _container(prev)]
    return rest[items[0]:] if items and items[0] > 0 and rest[items[0]] in fed else rest


def _container(path: str) -> str | None:
    """``a.b.layers`` for ``a.b.layers.3``: the list a numbered module is an item of (None when not numbered)."""
    parent, _, name = path.rpartition(".")
    return parent if name.isdigit() else None


def _is_residual(flow: nx.DiGraph, block: Block, nodes: list[str]) -> bool:
    """A block reads its hidden input at least twice: once to transform it, once to add it back."""
    inside = set(nodes)
    return sum(1 for s in flow.successors(block.hidden_in) if s in inside) >= 2


def _fed_siblings(flow, kid, nodes, owner, limit=256) -> set[str]:
    """Siblings reached from ``kid``'s outputs through nodes of no sibling (glue), breadth first, within
    ``limit`` glue nodes (so a side branch, e.g. a hidden state kept for a later projector, cannot hide the
    next block)."""
    inside = set(nodes)
    frontier = deque(s for n in nodes for s in flow.successors(n) if s not in inside)
    reached, seen = set(), set()
    while frontier and len(seen) < limit:
        key = frontier.popleft()
        if key in seen:
            continue
        seen.add(key)
        if key in owner:
            if owner[key] != kid:
                reached.add(owner[key])
            continue
        frontier.extend(flow.successors(key))
    return reached


def _kind_key(flow: nx.DiGraph, nodes: list[str]) -> str:
    """What makes two blocks the same kind: the shapes of the parameters they read, in order of first use
    (the op graph's hash for blocks without parameters)."""
    shapes = []
    for key in nodes:
        for pred in flow.predecessors(key):
            if flow.nodes[pred]["op"] == "param" and pred not in shapes:
                shapes.append(pred)
    if shapes:
        return repr([flow.nodes[p]["shape"] for p in shapes])
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
    for kid in run:
        nodes = members[kid]
        inside = set(nodes)
        outs = [n for n in nodes if _is_float(flow, n) and any(s not in inside for s in flow.successors(n))]
        hidden_out = max(outs, key=lambda n: flow.nodes[n]["order"]) if outs else nodes[-1]
        shape = flow.nodes[hidden_out]["shape"]
        entering = [p for n in nodes for p in flow.predecessors(n)
                    if p not in inside and flow.nodes[p]["shape"] == shape and _is_float(flow, p)]
        # the latest value of the hidden state's shape entering the block: the previous block's output, or
        # what glue between the blocks made of it (visual features added after a layer, say)
        hidden_in = max(entering, key=lambda n: flow.nodes[n]["order"]) if entering else nodes[0]
        kind = kinds.setdefault(hashes[kid], len(kinds))
        blocks.append(Block(kid, kind, hidden_in, hidden_out, len(nodes)))
    for block in blocks:
        block.feeds, block.side_values = _side_channels(flow, block, members, [b.path for b in blocks])
    return blocks


def _find_partners(flow, order, blocks: list[Block], others: list[Block]) -> None:
    """Set each decoder block's ``partners``: the blocks of the other stacks (``others``) that read a value it
    computes besides its hidden output, as a second stack attending to each decoder block's keys and values does
    (a vision-language-action model's action expert)."""
    if not others:
        return
    members = _members(flow, order)
    for block in blocks:
        paths = [block.path] + [other.path for other in others]
        block.partners = tuple(paths[i] for i in _side_channels(flow, block, members, paths)[0])


def _side_channels(flow, block: Block, members, paths: list[str]) -> tuple[tuple[int, ...], tuple]:
    """Indices of the other blocks that read a value ``block`` computes from its hidden input, other than its
    hidden output (keys and values shared across layers, say), directly or through glue outside every block; and
    the (shape, dtype) of each such value (the skipper compares them with what the block returns)."""
    owner = {key: index for index, path in enumerate(paths) for key in members[path]}
    me = paths.index(block.path)
    inside = set(members[block.path])
    computed = inside & nx.descendants(flow, block.hidden_in)  # not values merely passed through (position tables)
    exits = sorted((n for n in computed if n != block.hidden_out and any(s not in inside for s in flow.successors(n))),
                   key=lambda n: flow.nodes[n]["order"])
    outside = {n: [s for s in flow.successors(n) if s not in inside] for n in exits}
    readers = _readers(flow, [s for n in exits for s in outside[n]], owner, me)
    values = [(flow.nodes[n]["shape"], flow.nodes[n]["dtype"]) for n in exits
              if readers and _readers(flow, outside[n], owner, me)]
    return tuple(sorted(readers)), tuple(dict.fromkeys(values))


def _readers(flow, starts: list[str], owner: dict[str, int], me: int, limit: int = 64) -> set[int]:
    """The blocks other than ``me`` reached from ``starts`` through glue (nodes of no block), breadth first."""
    frontier = deque(starts)
    readers, seen = set(), set()
    while frontier and len(seen) < limit:
        key = frontier.popleft()
        if key in seen:
            continue
        seen.add(key)
        if key in owner:
            if owner[key] != me:
                readers.add(owner[key])
            continue
        frontier.extend(flow.successors(key))
    return readers
