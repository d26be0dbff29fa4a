"""The output of ``stsc profile``: the terminal table, a side-by-side comparison of profiles, the picture."""

from __future__ import annotations

import math
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING

from .proposal import Proposal, expected, signed

if TYPE_CHECKING:
    from .profile import Profile

__all__ = ["compare", "format_profile", "plot_profile"]


def compare(profiles: dict[str, Profile], method: str = "uniform") -> str:
    """A table of the :meth:`Profile.summary` of each profile, one column per name (e.g. per stage)."""
    summaries = {name: p.summary(method) for name, p in profiles.items()}
    rows = list(dict.fromkeys(key for summary in summaries.values() for key in summary))
    width = max(14, *(len(name) + 2 for name in summaries))

    def cell(value) -> str:
        return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = [f"{'':<26}" + "".join(f"{name:>{width}}" for name in summaries)]
    lines += [f"{row:<26}" + "".join(f"{cell(s.get(row)):>{width}}" for s in summaries.values()) for row in rows]
    return "\n".join(lines)


def format_profile(p: Profile) -> str:
    """The terminal table of a profile."""
    return "\n".join(_format(p))


def _format(p: Profile) -> list[str]:
    t = p.tokens
    lines = [f"profile      {p.batches} batch{'es' * (p.batches != 1)}, dense loss {p.dense_loss:.4f} "
             f"(training mode, forwards only, seed {p.seed}, {p.seconds:.1f} s)"]
    lines.append(f"tokens       {t.boundary or 'no'} boundary, {t.tokens_per_image if t.tokens_per_image else '-'} "
                 f"visual tokens per image")
    if t.points:
        ratios = sorted(set(t.keep_ratios), reverse=True)
        lines.append("  loss increase by the fraction of each image's visual tokens kept (pool: kernel)")
        lines.append("    " + f"{'method':<13}" + "".join(f"{r:>15g}" for r in ratios))
        for method in dict.fromkeys(pt.method for pt in t.points):
            cells = {}
            for pt in t.curve(method):
                column = min(ratios, key=lambda r: abs(math.log(r / pt.kept_fraction)))
                cells.setdefault(column, signed(pt.loss_increase) + (f" ({pt.kernel})" if pt.kernel else ""))
            lines.append("    " + f"{method:<13}" + "".join(f"{cells.get(r, '.'):>15}" for r in ratios))
    if t.neighbour_similarity:
        s = t.neighbour_similarity
        unit = "row of keys (tile)" if t.boundary == "cross_attention" else "image"
        lines.append(f"  nearest-neighbour cosine per {unit}: mean {fmean(s):.3f}, min {min(s):.3f}, max {max(s):.3f} "
                     f"({len(s)} {unit.split(' ')[0]}s)")
    lines += [f"  not measured  {note}" for note in t.not_measured]
    lines.append(f"layers       {len(p.blocks)} decoder blocks: 1 - cos(h_in, h_out), and the loss increase when "
                 f"the block alone is skipped")
    lines.append(f"    {'block':<6} {'path':<36} {'1-cos':>10} {'skipped':>10}")
    for b in p.blocks:
        change = "-" if b.change is None else f"{b.change:.4g}"
        note = f"  ({b.note})" if b.note else ""
        lines.append(f"    {b.index:<6} {b.path:<36} {change:>10} {signed(b.skip_increase):>10}{note}")
    lines += _format_proposal(p.proposal)
    return lines


def _format_proposal(q: Proposal) -> list[str]:
    lines = [f"proposal     tolerance {q.tolerance:g} of the dense loss: a loss increase of at most {q.budget:.4g}"]
    if q.compression:
        c = q.compression
        setting = f"kernel {c['kernel']}" if c["kernel"] else f"keep_ratio {c['keep_ratio']:g}"
        lines.append(f"  tokens     {c['method']} {setting}: keeps {c['kept_fraction']:.3f} of the visual tokens, "
                     f"loss {signed(c['loss_increase'])}")
    if q.skipping:
        s = q.skipping
        fit = f"line a {s['fit'][0]:.4g}, b {s['fit'][1]:.4g}" if s["fit"] else "fewer than two blocks"
        lines.append(f"  layers     eps {s['eps']:g} (depth fit of 1-cos: {fit}), alpha {s['alpha']:g}: first-order "
                     f"loss increase at the stage start {signed(s['estimate'])}")
    if q.check:
        c = q.check
        lines.append(f"  measured   {c['samples']} skip patterns sampled per batch at the stage start: "
                     f"layers {signed(c['layers'])}, with the compression {signed(c['both'])} "
                     f"(interaction {signed(c['interaction'])})")
    lines += [f"  note       {note}" for note in q.notes]
    for stage in q.stages:
        e = stage["expected"]
        passes = "; ".join(f"{name} " + ", ".join(f"{k}={v}" for k, v in params.items())
                           for name, params in stage["passes"].items()) or "dense"
        lines.append(f"  stage      {stage['name']}: {passes}")
        if e["sequence"] is not None:
            lines.append(f"    {expected(stage)}")
    return lines


def plot_profile(p: Profile, path: Path) -> None:
    """``path`` (PNG): loss increase against the fraction of visual tokens kept per method; per-block bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (tokens, change, skip) = plt.subplots(1, 3, figsize=(16, 4.5))
    for method in dict.fromkeys(pt.method for pt in p.tokens.points):
        curve = p.tokens.curve(method)
        tokens.plot([pt.kept_fraction for pt in curve], [pt.loss_increase for pt in curve], marker="o", label=method)
    if p.tokens.points:
        tokens.set_xscale("log", base=2)
        tokens.set_xticks(p.tokens.keep_ratios, [f"{r:g}" for r in p.tokens.keep_ratios])
        tokens.invert_xaxis()
        tokens.legend()
    else:
        tokens.text(0.5, 0.5, "not measured:\n" + "\n".join(p.tokens.not_measured), ha="center", va="center",
                    wrap=True, transform=tokens.transAxes)
    tokens.axhline(p.proposal.budget, color="grey", linestyle="--", linewidth=1)
    tokens.set(title="tokens: loss increase (dashed: tolerance)", xlabel="fraction of visual tokens kept",
               ylabel="loss increase")
    indices = [b.index for b in p.blocks]
    change.bar(indices, [b.change or 0.0 for b in p.blocks], color="tab:blue")
    change.set(title="layers: 1 - cos(h_in, h_out)", xlabel="decoder block", ylabel="mean over positions")
    skip.bar(indices, [b.skip_increase or 0.0 for b in p.blocks], color="tab:orange")
    skip.set(title="layers: loss increase, block skipped alone", xlabel="decoder block", ylabel="loss increase")
    for ax in (change, skip):
        ax.set_xticks(indices)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
