"""What a stage is expected to save: decoder sequence positions, decoder blocks run, decoder FLOPs.

Each pass may register an ``estimate(structure, config) -> Savings``; a stage's savings combine its
passes' (positions removed add up, fractions of blocks run multiply). FLOPs are the analytic decoder
count of :func:`decoder_flops` at the example's sequence length; :func:`stage_expectation` gives all three
for a stage's passes on a matched structure.
"""

from __future__ import annotations

from dataclasses import dataclass

from .registry import get_pass

__all__ = ["Expectation", "Savings", "decoder_flops", "stage_expectation"]


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


@dataclass(frozen=True)
class Expectation:
    """What a stage is expected to do, per sample at the example inputs."""

    sequence: int | None  # decoder sequence positions, dense
    sequence_after: float | None  # ... with the stage's passes
    layers_run: float  # mean fraction of decoder blocks run over the stage
    decoder_flops_saved: float | None  # fraction of decoder FLOPs saved over the stage


def stage_expectation(structure, passes) -> Expectation:
    """The expected savings of the pass entries ``passes`` (``stsc.policy.PassEntry``) on ``structure``,
    from each pass's registered ``estimate``."""
    estimates = [(get_pass(entry.name).estimate, entry.config) for entry in passes]
    savings = sum((estimate(structure, config) for estimate, config in estimates if estimate), Savings())
    shape = structure.hidden_shape
    if not shape or len(shape) != 3:
        return Expectation(None, None, savings.layers_run, None)
    sequence, hidden = shape[1], shape[2]
    return Expectation(sequence, sequence - savings.tokens_removed, savings.layers_run,
                       1 - savings.flops_fraction(sequence, hidden))
