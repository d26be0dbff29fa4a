"""Skip schedules: per-layer skip probabilities over a training stage, as pure functions.

The paper's schedule (``"sts"``), as printed in the authors' overview figure::

    p_l(e) = alpha * ((E - e) / E) ** 2 * (1 + eps * (2 * l - (L - 1)) / (L - 1))

e: progress within the stage in epochs (fractional by default, so a one-epoch stage still decays),
E: epochs of the stage, l: layer index from 0, L: number of layers. The depth factor runs linearly
from (1 - eps) at the first layer to (1 + eps) at the last, so the mean over layers is
``alpha * ((E - e) / E) ** 2`` and the mean over a whole stage is ``alpha / 3``.

Also ``"linear"`` (time factor ``(E - e) / E``, stage mean alpha / 2) and ``"constant"`` (time factor 1).

Defaults: ``alpha = 0.5``, ``eps = 0.5``. No values are published. alpha = 0.5 skips half the layers
at the start of the stage and on average a sixth over it (alpha / 3, an ideal decoder speed-up of
about 1.2x), the drop rate at which layer-drop methods (LayerDrop, progressive layer dropping)
report no loss in quality. eps = 0.5 skips the deepest layer three times as often as the first
(0.75 vs 0.25 at the start), since deeper layers are the more redundant ones, and keeps
alpha * (1 + eps) = 0.75 <= 1 so every probability is valid without capping.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

__all__ = ["SCHEDULES", "SkipSchedule", "StepClock", "depth_factor", "draw_skips", "layer_probabilities", "mean_skip_fraction",
           "seeded_generator",
           "sts_probability", "time_factor"]

SCHEDULES = ("sts", "linear", "constant")


@dataclass(frozen=True)
class SkipSchedule:
    """How likely each decoder block is to be skipped at a point of the stage."""

    schedule: str = "sts"  # one of SCHEDULES
    alpha: float = 0.5  # peak mean skip probability (at the start of the stage)
    eps: float = 0.5  # depth spread: first layer alpha * (1 - eps), last alpha * (1 + eps)
    epochs: float = 1.0  # E, epochs of the stage
    integer_epochs: bool = False  # use completed epochs only (the rate then moves once per epoch)
    never_skip_first: int = 0  # the first n blocks always run
    never_skip_last: int = 0  # the last n blocks always run
    min_kept: int = 1  # at least this many blocks run in every step

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 <= self.eps <= 1:
            raise ValueError(f"eps must be in [0, 1], got {self.eps}")
        if not 0 <= self.alpha or self.alpha * (1 + self.eps) > 1:
            raise ValueError(f"alpha * (1 + eps) must be in [0, 1] so that every skip probability is valid, "
                             f"got alpha={self.alpha}, eps={self.eps} ({self.alpha * (1 + self.eps):g})")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        for name in ("never_skip_first", "never_skip_last"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.min_kept < 1:
            raise ValueError(f"min_kept must be >= 1 so that every step runs at least one block, got {self.min_kept}")


def time_factor(kind: str, progress: float, epochs: float) -> float:
    """The schedule's decay over the stage at ``progress`` epochs, clamped to the stage."""
    remaining = min(max((epochs - progress) / epochs, 0.0), 1.0)
    return {"sts": remaining ** 2, "linear": remaining, "constant": 1.0}[kind]


def depth_factor(layer: int, layers: int, eps: float) -> float:
    """``1 + eps * (2l - (L-1)) / (L-1)``: from 1 - eps at the first layer to 1 + eps at the last."""
    return 1.0 if layers == 1 else 1 + eps * (2 * layer - (layers - 1)) / (layers - 1)


def sts_probability(layer: int, layers: int, progress: float, epochs: float, alpha: float, eps: float) -> float:
    """The paper's p_l(e) for one layer (``layers`` = L >= 1; one layer has no depth spread)."""
    return alpha * time_factor("sts", progress, epochs) * depth_factor(layer, layers, eps)


def layer_probabilities(schedule: SkipSchedule, layers: int, progress: float,
                        skippable: list[bool] | None = None) -> list[float]:
    """Skip probability of each of ``layers`` blocks at ``progress`` epochs into the stage.

    Blocks excluded by ``never_skip_first`` / ``never_skip_last`` or marked not ``skippable`` get 0.
    """
    if schedule.integer_epochs:
        progress = math.floor(progress)
    factor = time_factor(schedule.schedule, progress, schedule.epochs)
    probabilities = []
    for layer in range(layers):
        protected = layer < schedule.never_skip_first or layer >= layers - schedule.never_skip_last
        allowed = skippable is None or skippable[layer]
        probability = schedule.alpha * factor * depth_factor(layer, layers, schedule.eps)
        probabilities.append(0.0 if protected or not allowed else probability)
    return probabilities


def mean_skip_fraction(schedule: SkipSchedule, skippable: list[bool], samples: int = 100) -> float:
    """Expected fraction of the blocks skipped, averaged over the stage (before ``min_kept`` capping)."""
    total = 0.0
    for k in range(samples):
        progress = (k + 0.5) / samples * schedule.epochs
        total += sum(layer_probabilities(schedule, len(skippable), progress, skippable))
    return total / samples / max(len(skippable), 1)


@dataclass
class StepClock:
    """The global training step and the training forwards counted within it: what seeds a pass's draws.

    ``micro_step`` counts forwards since ``step`` last changed (micro-batches of gradient
    accumulation), so every forward draws anew, and a run resumed from :meth:`state_dict` draws the same.
    """

    step: int = 0
    micro_step: int = 0

    def set_step(self, step: int) -> None:
        if step != self.step:
            self.step, self.micro_step = int(step), 0

    def tick(self) -> tuple[int, int]:
        """``(step, micro_step)`` for this forward; the next forward gets the following micro step."""
        current = (self.step, self.micro_step)
        self.micro_step += 1
        return current

    def state_dict(self) -> dict:
        return {"step": self.step, "micro_step": self.micro_step}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.micro_step = int(state["step"]), int(state["micro_step"])


def seeded_generator(seed: int, step: int, micro_step: int) -> torch.Generator:
    """A CPU generator that depends only on ``(seed, step, micro_step)``: the same in every process."""
    digest = hashlib.sha256(f"stsc:{seed}:{step}:{micro_step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


def draw_skips(probabilities: list[float], seed: int, step: int, micro_step: int, min_kept: int) -> list[int]:
    """Indices of the blocks to skip, drawn from a generator seeded by ``(seed, step, micro_step)``.

    The same arguments give the same answer in every process (every rank of a distributed run, and a
    resumed run). If fewer than ``min_kept`` blocks would run, the skipped blocks with the lowest
    probability (then the lowest index) run after all.
    """
    draws = torch.rand(len(probabilities), generator=seeded_generator(seed, step, micro_step), dtype=torch.float64).tolist()
    skipped = [i for i, (u, p) in enumerate(zip(draws, probabilities)) if u < p]
    excess = len(skipped) - (len(probabilities) - min(min_kept, len(probabilities)))
    if excess > 0:
        for i in sorted(skipped, key=lambda i: (probabilities[i], i))[:excess]:
            skipped.remove(i)
    return skipped
