"""What a stage is expected to save: decoder sequence positions, decoder blocks run, decoder FLOPs.

Each pass may register an ``estimate(structure, config) -> Savings``; a stage's savings combine its
passes' (positions removed add up, fractions of blocks run multiply). FLOPs are the analytic decoder
count of :func:`decoder_flops` at the example's sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Savings", "decoder_flops"]


@dataclass(frozen=True)
class Savings:
    tokens_removed: float = 0.0  # decoder sequence positions removed per sample
    layers_run: float = 1.0  # mean fraction of decoder blocks that run, over the stage

    def __add__(self, other: "Savings") -> "Savings":
        return Savings(self.tokens_removed + other.tokens_removed, self.layers_run * other.layers_run)

    def flops_fraction(self, sequence: int, hidden: int) -> float:
        """Decoder FLOPs of the stage / dense decoder FLOPs, at ``sequence`` positions of width ``hidden``."""
        short = max(sequence - self.tokens_removed, 0)
        return self.layers_run * decoder_flops(short, hidden, 1) / decoder_flops(sequence, hidden, 1)


def decoder_flops(sequence: float, hidden: int, layers: int) -> float:
    """Forward FLOPs of LLaMA-style decoder blocks: projections (4 d^2 attention + 3 * 8/3 d^2 SwiGLU,
    x2 per multiply-add) plus attention scores and weighted values (2 * 2 S^2 d)."""
    return layers * (2 * sequence * (4 + 8) * hidden * hidden + 4 * sequence * sequence * hidden)
