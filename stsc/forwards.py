"""Which call of a model is a training forward: the one a pass reads its inputs and draws its decisions for.

A pass acts once per forward of the model: it reads the model's inputs (the visual positions are computed from
them) and draws that forward's decisions (blocks to skip, tokens to keep) before the decoder runs. Callers do not
always call the model itself: TRL's ``SFTTrainer`` computes its loss with a fused LM head that calls the model's
backbone (the module that merges the visual tokens and runs the decoder) and projects the hidden states itself.
So a forward is the outermost call of the model or of any module that runs both the merge and every decoder
block: the ancestors of the decoder entry (of the first decoder block when there is no entry, or no merge). Their
keyword arguments are the model's inputs by the same names (a model passes its inputs down by keyword).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["ForwardScope", "forward_modules"]


def forward_modules(model: nn.Module, structure) -> list[nn.Module]:
    """The model and its modules a forward may start at: the ancestors of the decoder entry (of the first decoder
    block without one), outermost first."""
    boundary = structure.boundary
    inner = boundary.decoder_entry if boundary is not None and boundary.decoder_entry else structure.blocks[0].path
    parts = inner.split(".")
    return [model.get_submodule(".".join(parts[:depth])) for depth in range(len(parts))]


class ForwardScope:
    """``enter(module, args, kwargs)`` before, and ``leave()`` after, the outermost call among ``modules`` (also
    when it raises); calls of the others inside it belong to the same forward."""

    def __init__(self, modules: list[nn.Module], enter: Callable, leave: Callable | None = None):
        self.enter, self.leave = enter, leave
        self.depth = 0
        self.handles = [m.register_forward_pre_hook(self._before, with_kwargs=True) for m in modules]
        self.handles += [m.register_forward_hook(self._after, always_call=True) for m in modules]

    @torch.compiler.disable
    def _before(self, module, args, kwargs):
        self.depth += 1
        if self.depth == 1:
            self.enter(module, args, kwargs)

    @torch.compiler.disable
    def _after(self, *_):
        self.depth = max(self.depth - 1, 0)  # a hook that raised before ours never entered
        if self.depth == 0 and self.leave is not None:
            self.leave()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
