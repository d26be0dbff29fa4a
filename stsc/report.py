"""Report: what capture and match found, as a dataclass, a JSON-ready dict and a readable table."""

from __future__ import annotations

import time
import weakref
from dataclasses import asdict, dataclass, field

from torch import nn

from .capture import capture
from .errors import CaptureError, UnsupportedModelError, looking_for
from .match import Block, Boundary, Structure, match
from .registry import available_passes, get_pass

__all__ = ["Report", "capture_and_match", "inspect"]


@dataclass
class Report:
    capture_method: str  # "export" or "dynamo"
    graphs: int
    fallback_reason: str | None
    blocks: list[str]  # decoder block module paths, in execution order
    block_details: list[Block]
    block_kinds: int
    vision_blocks: list[str]
    boundary: Boundary | None
    token_input: str | None
    notes: list[str] = field(default_factory=list)
    capture_notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    support: dict[str, str] = field(default_factory=dict)  # pass name -> "ok" or why it cannot work here

    @property
    def supported(self) -> bool:
        """True when decoder blocks were found (the minimum any pass needs)."""
        return bool(self.blocks)

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        lines = [f"capture      {self.capture_method} ({self.graphs} graph{'s' * (self.graphs != 1)}, "
                 f"{self.seconds:.1f} s)"]
        if self.fallback_reason:
            lines.append(f"  fallback   {self.fallback_reason}")
        lines += [f"  note       {note}" for note in self.capture_notes]
        lines.append(f"token input  {self.token_input or '-'}")
        b = self.boundary
        if b is None:
            lines.append("boundary     no vision boundary found")
        else:
            grid = (f"{b.grid[0]}x{b.grid[1]}" if b.grid
                    else f"per image from {b.grid_input} / {b.grid_scale}" if b.grid_input else "-")
            layout = (", rows separated by break tokens" if b.rows_layout
                      else ", images back to back in one run" if b.cut else "")
            positions = getattr(b.positions, "code", None) or (repr(b.positions) if b.positions else "-")
            lines += [
                f"boundary     {b.kind} ({b.merge_op} at {b.merge_node})",
                f"  visual tokens   {b.visual_tokens} shape {list(b.visual_shape or ())}, "
                f"from module '{b.producer_module or '-'}'",
                f"  per image       {b.tokens_per_image if b.tokens_per_image is not None else '-'} tokens, "
                f"grid {grid}, {b.images if b.images is not None else '-'} images in the example{layout}",
                *([f"  pictures        {_pictures(b.picture_views)}"] if b.picture_views else []),
                f"  positions       {positions}",
                f"  placeholder id  {b.placeholder_id if b.placeholder_id is not None else '-'}",
                f"  pixel inputs    {', '.join(b.vision_inputs)}",
                f"  decoder entry   {b.decoder_entry or '-'}",
                f"  padding mask    {b.padding_input or '-'}",
            ]
        kinds = f", {self.block_kinds} kinds" if self.block_kinds > 1 else ""
        lines.append(f"decoder      {len(self.blocks)} blocks{kinds}")
        for i, block in enumerate(self.block_details):
            lines.append(f"  {i:>3}  {block.path}  (kind {block.kind}, {block.nodes} nodes)")
        if self.vision_blocks:
            lines.append(f"vision       {len(self.vision_blocks)} blocks: {self.vision_blocks[0]} .. {self.vision_blocks[-1]}")
        lines += [f"not found    {note}" for note in self.notes]
        lines += [f"support      {name}: {verdict}" for name, verdict in self.support.items()]
        return "\n".join(lines)


def _pictures(views: list[tuple[int, int, int, int]]) -> str:
    """``2 pictures of 2 views each (...): row 0 positions 2-66, row 1 positions 2-66``."""
    counts = [n for *_, n in views]
    each = f"{counts[0]} views each" if len(set(counts)) == 1 else f"{', '.join(map(str, counts))} views"
    return (f"{len(views)} picture{'s' * (len(views) != 1)} of {each} (views opened by different markers): "
            + ", ".join(f"row {row} positions {first}-{last}" for row, first, last, _ in views))


SPARSIFIED: weakref.WeakSet = weakref.WeakSet()  # the models a SparseModel has installed its passes on


def capture_and_match(model: nn.Module, example_inputs: dict) -> tuple[Structure, Report]:
    """Capture ``model(**example_inputs)``, match it, and report what was found."""
    if model in SPARSIFIED:
        raise UnsupportedModelError("this model is already sparsified: its passes are installed on it; call "
                                    "sparsify() once on the original model (sparse.unwrap() removes the passes and "
                                    "returns it)")
    start = time.perf_counter()
    with looking_for("capture: a graph of the model's forward on the example inputs", CaptureError):
        cap = capture(model, example_inputs)
    structure = match(cap)
    support = {}
    for name in available_passes():
        with looking_for(f"pass {name}: checking that the model has the structure it needs"):
            problem = get_pass(name).check(structure) if get_pass(name).check else None
        support[name] = f"not supported: {problem}" if problem else "ok"
    report = Report(cap.method, len(cap.graphs), cap.fallback_reason, [b.path for b in structure.blocks],
                    structure.blocks, structure.block_kinds, structure.vision_blocks, structure.boundary,
                    structure.token_input, structure.notes, cap.notes, time.perf_counter() - start, support)
    return structure, report


def inspect(model: nn.Module, example_inputs: dict) -> Report:
    """Capture ``model(**example_inputs)`` and report its decoder blocks and vision boundary."""
    return capture_and_match(model, example_inputs)[1]
