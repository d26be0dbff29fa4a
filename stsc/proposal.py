"""Propose a stage policy from a redundancy profile (:func:`stsc.profile.profile`).

**Tolerance.** ``tolerance`` is relative to the dense loss: the proposal may raise the training loss
on the profiled batches by at most ``budget = tolerance * |dense loss|`` (default 0.01, i.e. 1 %).
A relative bound reads the same for any model and loss scale; the absolute budget is reported too.

**Keep ratio** (``compress_visual_tokens``): among the measured settings that keep fewer than all
visual tokens and whose measured loss increase is at most the budget, the one keeping the smallest
fraction of the tokens (ties: the smaller increase, then the order of ``METHODS``). Its method is the
proposed method (``pool``: its kernel). No setting under the budget: no compression is proposed.

**eps** (``skip_layers``): fitted to the depth trend of the per-block change ``1 - cos(h_in, h_out)``.
The least-squares line ``m(x) = a + b x`` is fitted over the blocks' depth coordinates
``x_l = (2l - (L - 1)) / (L - 1)`` (the schedule's own: -1 at the first block, 1 at the last). A block
that changes the hidden state less is more redundant, so the skip probability mirrors the change's
relative slope: ``eps = -b / a``, clipped to [0, 1] (0 when ``a <= 0``, i.e. no block changes anything,
or when fewer than two blocks were measured), rounded to 0.01. A change that grows with depth gives
eps = 0: the schedule cannot favour shallow blocks.

**alpha**: a schedule's expected loss increase is estimated to first order at the start of the stage,
where skipping peaks::

    estimate(alpha, eps) = sum_l p_l(0) * max(d_l, 0)

``p_l(0)`` is the pass's skip probability of block l at progress 0 (``alpha * (1 + eps * x_l)``;
0 for blocks the pass cannot or may not skip, e.g. ``never_skip_first`` in the base policy) and
``d_l`` the measured loss increase of skipping block l alone: a skip pattern's increase is taken as
the sum of its blocks' own increases, and a block whose skipping lowers the loss earns no credit.
The estimate is linear in alpha; alpha is the largest value, rounded down to 0.01, whose estimate is
at most the budget and with ``alpha * (1 + eps) <= 1`` (every block measured at 0: alpha =
1 / (1 + eps), the largest allowed). Below 0.01 no skipping is proposed. Later in the stage the
probabilities only decrease (``sts``: by ``((E - e) / E)^2``; ``constant``: they stay), so the bound
holds over the whole stage. The profile then measures the proposed schedule on sampled skip patterns
(how far blocks interact).

**The policy** is the base policy (default: the ``sts`` preset) with these values: its stages, their
lengths and every other pass parameter are kept; each ``compress_visual_tokens`` entry gets the
proposed method and keep ratio, each ``skip_layers`` entry the proposed alpha and eps; an entry with
nothing to propose is left out (a stage left without passes is dense). Its expected savings are the
passes' own estimates (:func:`stsc.savings.stage_expectation`), as ``stsc transform`` reports them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field

import yaml

from .passes.compress_visual_tokens import METHODS
from .policy import Policy, parse_policy
from .savings import stage_expectation
from .schedules import depth_factor, layer_probabilities

__all__ = ["Proposal", "check_tolerance", "choose_alpha", "choose_compression", "expected", "fit_eps", "propose", "signed",
           "skip_estimate"]

DEFAULT_TOLERANCE = 0.01


@dataclass
class Proposal:
    """A proposed policy and what it rests on (see the module docstring)."""

    tolerance: float  # relative to the dense loss
    budget: float  # the loss increase allowed: tolerance * |dense loss|
    compression: dict | None  # the chosen token setting: method, keep_ratio, kernel, kept_fraction, loss_increase
    skipping: dict | None  # alpha, eps, estimate (first order, at the stage start), fit (a, b)
    stages: list[dict]  # name, unit, start, end, passes (parameters as written), expected (savings)
    notes: list[str] = field(default_factory=list)  # what was left out of the policy and why
    check: dict | None = None  # measured on the model with the proposed settings (stsc.profile)
    base: str = "sts"  # the base policy's source
    body: dict = field(default_factory=dict)  # the policy, as Policy.to_dict() gives it

    @property
    def policy(self) -> Policy:
        return parse_policy(self.yaml(), source="<proposed policy>")

    def to_dict(self) -> dict:
        return asdict(self)

    def yaml(self) -> str:
        """The policy as YAML, with a header comment: tolerance, what was measured, expected savings."""
        lines = [f"# Proposed by `stsc profile`: tolerance {self.tolerance:g} of the dense loss "
                 f"(a loss increase of at most {self.budget:.4g}); base policy {self.base}."]
        if self.compression:
            c = self.compression
            lines.append(f"#   tokens: {_setting(c)} keeps {c['kept_fraction']:.3f} of the visual tokens, "
                         f"measured loss increase {signed(c['loss_increase'])}")
        if self.skipping:
            s = self.skipping
            lines.append(f"#   layers: alpha {s['alpha']:g}, eps {s['eps']:g}: first-order loss increase at the stage "
                         f"start {signed(s['estimate'])}")
        if self.check:
            lines.append(f"#   measured with {self.check['samples']} skip patterns sampled per batch: layers "
                         f"{signed(self.check['layers'])}, tokens and layers together {signed(self.check['both'])}")
        lines += [f"#   {note}" for note in self.notes]
        lines += [f"#   {stage['name']}: {expected(stage)}" for stage in self.stages if stage["expected"]["sequence"]]
        return "\n".join(lines) + "\n" + yaml.safe_dump(self.body, sort_keys=False, default_flow_style=None)


def _setting(point: dict) -> str:
    return f"pool kernel {point['kernel']}" if point["kernel"] else f"{point['method']} keep_ratio {point['keep_ratio']:g}"


def signed(value: float | None) -> str:
    """A loss increase as text: ``+0.0123``, ``-4.5e-05``, ``-`` for none."""
    return "-" if value is None else f"{value:+.4g}"


def expected(stage: dict) -> str:
    """A proposed stage's expected savings (``Proposal.stages`` item), as ``stsc transform`` words them."""
    e = stage["expected"]
    return (f"expected decoder sequence {e['sequence']} -> {e['sequence_after']:g} positions per sample, "
            f"{100 * e['layers_run']:.1f} % of decoder blocks run, decoder FLOPs -{100 * e['decoder_flops_saved']:.1f} %")


def check_tolerance(tolerance: float) -> None:
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0 (a fraction of the dense loss), got {tolerance}")


# ------------------------------------------------------------------------------------- the choices
def choose_compression(points: list, budget: float):
    """The measured token setting keeping the smallest fraction within ``budget`` (None: none does)."""
    fits = [p for p in points if p.kept_fraction < 1 and p.loss_increase <= budget]
    return min(fits, key=lambda p: (p.kept_fraction, p.loss_increase, METHODS.index(p.method)), default=None)


def fit_eps(changes: dict[int, float], layers: int) -> tuple[float, tuple[float, float] | None]:
    """eps from the per-block ``changes`` (block index -> change) of a stack of ``layers`` blocks, and the
    fitted line ``(a, b)`` (None with fewer than two blocks)."""
    if len(changes) < 2 or layers < 2:
        return 0.0, None
    xs = [depth_factor(index, layers, 1.0) - 1 for index in changes]  # x_l in [-1, 1]
    ys = list(changes.values())
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    b = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread
    a = mean_y - b * mean_x
    eps = min(max(-b / a, 0.0), 1.0) if a > 0 else 0.0
    return round(eps, 2), (a, b)


def _allowed(config, blocks: list) -> list[bool]:
    """Blocks the pass may skip: measured as skippable, and of a kind ``config`` allows."""
    return [b.skip_increase is not None and config.allows_kind(b.kind) for b in blocks]


def skip_estimate(config, blocks: list) -> float:
    """First-order loss increase of the ``skip_layers`` ``config`` at the start of its stage (module docstring)."""
    probabilities = layer_probabilities(config.skip_schedule(), len(blocks), 0.0, _allowed(config, blocks))
    return sum(p * max(b.skip_increase, 0.0) for p, b in zip(probabilities, blocks) if p > 0)


def choose_alpha(config, blocks: list, budget: float):
    """``config`` (a ``SkipLayersConfig`` whose eps is set) with the largest alpha under ``budget``; None
    when no block may be skipped or even alpha 0.01 is over the budget."""
    largest = dataclasses.replace(config, alpha=1 / (1 + config.eps))
    if not any(layer_probabilities(largest.skip_schedule(), len(blocks), 0.0, _allowed(config, blocks))):
        return None
    estimate = skip_estimate(largest, blocks)
    alpha = largest.alpha if estimate <= budget else largest.alpha * budget / estimate
    alpha = math.floor(round(alpha * 100, 6)) / 100
    return dataclasses.replace(config, alpha=alpha) if alpha >= 0.01 else None


# ------------------------------------------------------------------------------------- the policy
def propose(tokens, blocks: list, dense_loss: float, structure, base: Policy,
            tolerance: float = DEFAULT_TOLERANCE) -> Proposal:
    """The proposal for a profile's ``tokens`` and ``blocks`` measures (see the module docstring)."""
    check_tolerance(tolerance)
    budget = tolerance * abs(dense_loss)
    point = choose_compression(tokens.points, budget)
    eps, line = fit_eps({b.index: b.change for b in blocks if b.change is not None}, len(blocks))
    notes, skipping = [], None
    if point is None:
        notes.append("compress_visual_tokens left out: " + (
            "no setting keeping fewer tokens stays within the budget" if tokens.points
            else "visual-token compression was not measured"))
    body = base.to_dict()
    for stage, written in zip(base.stages, body["stages"]):
        passes = {}
        for entry in stage.passes:
            params = dict(entry.params)
            if entry.name == "compress_visual_tokens":
                if point is None:
                    continue
                params = {k: v for k, v in params.items() if k not in ("method", "keep_ratio", "kernel")}
                params.update({"method": point.method, "kernel": point.kernel} if point.kernel
                              else {"method": point.method, "keep_ratio": point.keep_ratio})
            elif entry.name == "skip_layers":
                config = choose_alpha(dataclasses.replace(entry.config, alpha=0.0, eps=eps), blocks, budget)
                if config is None:
                    notes.append(f"skip_layers left out of stage {stage.name!r}: no block may be skipped, or even "
                                 f"alpha 0.01 exceeds the budget")
                    continue
                skipping = skipping or {"alpha": config.alpha, "eps": config.eps,
                                        "estimate": skip_estimate(config, blocks), "fit": line}
                params.update(alpha=config.alpha, eps=config.eps)
            passes[entry.name] = params
        written["passes"] = passes
    proposal = Proposal(tolerance, budget, asdict(point) if point else None, skipping, [], notes,
                        base=base.source, body=body)
    proposal.stages = [{"name": s.name, "unit": s.unit, "start": s.start, "end": s.end,
                        "passes": {e.name: dict(e.params) for e in s.passes},
                        "expected": asdict(stage_expectation(structure, s.passes))} for s in proposal.policy.stages]
    return proposal
