"""``stsc.profile``: measure visual-token and layer redundancy on training batches, and propose a policy.

**How it measures.** Forwards only, in training mode, without gradients or an optimizer step. Every
forward runs right after ``torch.manual_seed(seed)``, so two forwards differ only by the sparsity
being measured (dropout draws the same masks where shapes agree), and the dense loss is exactly the
model's own training-mode loss on the batch under that seed. The model is captured and matched once;
each measurement installs a pass's own runtime (:mod:`stsc.passes`) and removes it again. Afterwards
the model is as it was: parameters, buffers, gradients, every module's ``training`` flag and the
caller's RNG state. A loss increase is ``loss - dense loss`` on the same batch, averaged over batches.

**Token redundancy**, at the matched vision boundary:

* ``points``: the loss increase when every image keeps part of its visual tokens, through
  ``compress_visual_tokens`` itself, for each method at keep ratios 1, 0.75, 0.5, 0.25, 0.125
  (``pool`` keeps what its kernel gives: kernels ``round(1 / sqrt(r))`` for those ratios, i.e. 1, 2
  and 3; ``kept_fraction`` is what each setting kept in the batches). Keep ratio 1 changes nothing:
  its increase is exactly 0.
* ``neighbour_similarity`` (no loss needed), one value per image: the mean over the image's visual
  tokens of the cosine similarity to the most similar other visual token of the same image, in the
  hidden state entering the first decoder block (cross-attention merges: the projector's output, per
  row of keys, i.e. per image tile). Near 1: most tokens have a near-duplicate, and compression should
  cost little; low: every token carries its own direction.

**Layer redundancy**, per decoder block:

* ``change``: ``1 - cos(h_in, h_out)`` between the hidden state entering and leaving the block,
  averaged over all positions, computed as ``|h_in/|h_in| - h_out/|h_out||^2 / 2`` (the same quantity,
  without the cancellation of ``1 - cos`` near 1), so a block that returns its input measures exactly 0.
* ``skip_increase``: the loss increase when that block alone is skipped (``LayerSkipper.force([i])``).

**Proposal**: :mod:`stsc.proposal` (tolerance, the estimate behind alpha, the eps fit). It is then
measured: ``check`` holds the loss increase with skip patterns drawn by the proposed schedule at the
start of its stage (``samples`` draws), alone and together with the proposed compression, and the
interaction ``both - (tokens + layers)``: how far the two kinds of sparsity do not simply add up.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import fmean

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from .capture import first_line, forward_kwargs
from .errors import looking_for
from .layout import images_in
from .passes.compress_visual_tokens import METHODS, CompressVisualTokensConfig
from .passes.skip_layers import SkipLayersConfig, bind_blocks
from .policy import Policy, load_policy
from .positions import Slots
from .profile_output import format_profile, plot_profile
from .proposal import DEFAULT_TOLERANCE, Proposal, check_tolerance, propose
from .registry import get_pass
from .report import capture_and_match
from .sparse import UnsupportedModelError, eval_mode, model_loss, untouched

__all__ = ["KEEP_RATIOS", "BlockProfile", "Profile", "TokenPoint", "TokenProfile", "check_arguments", "hidden_change",
           "neighbour_similarity", "profile"]

KEEP_RATIOS = (1.0, 0.75, 0.5, 0.25, 0.125)


@dataclass
class TokenPoint:
    """One compression setting and what it cost."""

    method: str
    keep_ratio: float | None  # None for pool (its kernel sets what is kept)
    kernel: int | None  # pool only
    kept_fraction: float  # visual tokens kept / visual tokens, over the batches
    loss_increase: float


@dataclass
class TokenProfile:
    boundary: str | None  # the merge kind; None: no vision boundary
    tokens_per_image: int | list[int] | None
    keep_ratios: list[float]  # the ratios asked for
    points: list[TokenPoint] = field(default_factory=list)
    neighbour_similarity: list[float] = field(default_factory=list)  # per image, over the batches
    not_measured: list[str] = field(default_factory=list)  # what was not measured, and why

    def curve(self, method: str) -> list[TokenPoint]:
        """``method``'s points, from the most tokens kept to the fewest."""
        return sorted((p for p in self.points if p.method == method), key=lambda p: -p.kept_fraction)


@dataclass
class BlockProfile:
    index: int
    path: str
    kind: int
    change: float | None  # mean 1 - cos(h_in, h_out); None: not measured (see note)
    skip_increase: float | None  # loss increase with this block alone skipped; None: not skippable (see note)
    note: str | None = None


@dataclass
class Profile:
    """What :func:`profile` measured and proposes (see the module docstring)."""

    batches: int
    seed: int
    dense_losses: list[float]  # per batch
    tokens: TokenProfile
    blocks: list[BlockProfile]
    proposal: Proposal
    model: dict  # what capture and match found, in short
    seconds: float

    @property
    def dense_loss(self) -> float:
        return fmean(self.dense_losses)

    def to_dict(self) -> dict:
        return {"batches": self.batches, "seed": self.seed, "dense_loss": self.dense_loss,
                "dense_losses": self.dense_losses, "tokens": asdict(self.tokens),
                "blocks": [asdict(b) for b in self.blocks],
                "proposal": {**self.proposal.to_dict(), "yaml": self.proposal.yaml()},
                "model": self.model, "seconds": self.seconds}

    def format(self) -> str:
        """The terminal table."""
        return format_profile(self)

    def summary(self, method: str = "uniform") -> dict:
        """Headline figures, to compare profiles taken at different points (e.g. at each stage's start, on
        that stage's batches): the dense loss; ``method``'s loss increase at each keep ratio it was measured
        at; the mean nearest-neighbour cosine; the mean over the measured blocks of ``1 - cos`` and of the
        loss increase when skipped alone; the proposed keep ratio (or pool kernel), alpha and eps."""
        changes = [b.change for b in self.blocks if b.change is not None]
        skips = [b.skip_increase for b in self.blocks if b.skip_increase is not None]
        similarity = self.tokens.neighbour_similarity
        c, s = self.proposal.compression or {}, self.proposal.skipping or {}
        return {"dense_loss": self.dense_loss,
                **{f"{method} keep {p.keep_ratio:g}": p.loss_increase
                   for p in self.tokens.curve(method) if p.keep_ratio is not None},
                "neighbour_similarity": fmean(similarity) if similarity else None,
                "block_change": fmean(changes) if changes else None,
                "block_skip_increase": fmean(skips) if skips else None,
                "proposed_method": c.get("method"), "proposed_keep_ratio": c.get("keep_ratio"),
                "proposed_kernel": c.get("kernel"), "proposed_alpha": s.get("alpha"), "proposed_eps": s.get("eps")}

    def plot(self, path: str | Path) -> None:
        """``path`` (a PNG): loss increase against the fraction of tokens kept per method, and the
        per-block measures as bars. Needs matplotlib."""
        plot_profile(self, Path(path))

    def write(self, out: str | Path, picture: bool = True) -> list[Path]:
        """Write ``profile.json``, the proposed ``policy.yaml`` and (``picture``) ``profile.png`` into ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "profile.json", out / "policy.yaml"]
        written[0].write_text(json.dumps(self.to_dict(), indent=2, default=str))
        written[1].write_text(self.proposal.yaml())
        if picture:
            self.plot(out / "profile.png")
            written.append(out / "profile.png")
        return written


def profile(model: nn.Module, batches: Iterable[dict], example_inputs: dict | None = None, *,
            tolerance: float = DEFAULT_TOLERANCE, policy: Policy | str = "sts", methods: Iterable[str] = METHODS,
            keep_ratios: Iterable[float] = KEEP_RATIOS, samples: int = 8, seed: int = 0,
            progress: Callable[[str], None] | None = None) -> Profile:
    """Measure ``model``'s token and layer redundancy on ``batches`` and propose a policy.

    ``batches``: forward keyword arguments of training batches (measures are averaged over them).
    ``example_inputs``: what the model is captured on (default: the first batch).
    ``tolerance``: the loss increase the proposal may cost, as a fraction of the dense loss.
    ``policy``: the base policy the proposal fills in (a :class:`Policy`, a YAML path or a preset name).
    ``methods``, ``keep_ratios``: the compression settings measured. ``samples``: skip patterns drawn
    to check the proposed schedule. ``seed``: set before every forward. ``progress``: called with a
    line before each measurement.
    """
    start = time.perf_counter()
    batches = [dict(b) for b in batches]
    if not batches:
        raise ValueError("profile needs at least one batch")
    methods, keep_ratios = check_arguments(methods, keep_ratios, samples, tolerance)
    base = load_policy(policy)
    if isinstance(policy, str):
        base = dataclasses.replace(base, source=policy)  # "sts", not the preset's installed path
    example = dict(example_inputs if example_inputs is not None else batches[0])
    with untouched(model), looking_for("profile: measuring the model's token and layer redundancy on the batches"):
        if progress:
            progress("profile: capturing and matching the model")
        structure, report = capture_and_match(model, example)
        if not structure.blocks:
            reason = next(n for n in structure.notes if n.startswith("no decoder blocks"))
            raise UnsupportedModelError(f"profile needs decoder blocks: {reason}")
        session = _Session(model, structure, example, batches, seed, progress)
        tokens, blocks = session.measure(report.support["compress_visual_tokens"], methods, keep_ratios)
        proposal = propose(tokens, blocks, fmean(session.dense), structure, base, tolerance)
        proposal.check = session.check(proposal, samples)
        if proposal.check and proposal.check["layers"] > proposal.budget:
            proposal.notes.append("the sampled skip patterns cost more than the budget: blocks interact beyond the "
                                  "first-order estimate; use a lower alpha or tolerance")
    b = structure.boundary
    summary = {"capture": report.capture_method, "blocks": report.blocks, "boundary": b.kind if b else None,
               "tokens_per_image": b.tokens_per_image if b else None, "support": report.support}
    return Profile(len(batches), seed, session.dense, tokens, blocks, proposal, summary,
                   time.perf_counter() - start)


def check_arguments(methods: Iterable[str], keep_ratios: Iterable[float], samples: int,
                    tolerance: float) -> tuple[list[str], list[float]]:
    """:func:`profile`'s settings, checked before anything runs (a ``ValueError`` says what is wrong)."""
    check_tolerance(tolerance)
    methods, keep_ratios = list(methods), [float(r) for r in keep_ratios]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be some of {', '.join(METHODS)}, got {', '.join(unknown) or 'none'}")
    if not keep_ratios or not all(0 < r <= 1 for r in keep_ratios):
        raise ValueError(f"keep ratios must be in (0, 1], got {keep_ratios}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    return methods, keep_ratios


# ------------------------------------------------------------------------------------- the measures
def hidden_change(h_in: torch.Tensor, h_out: torch.Tensor) -> float:
    """Mean over positions of ``1 - cos(h_in, h_out)``, as ``|u_in - u_out|^2 / 2`` of the unit vectors."""
    u_in, u_out = F.normalize(h_in.double(), dim=-1), F.normalize(h_out.double(), dim=-1)
    return (u_in - u_out).pow(2).sum(-1).mean().item() / 2


def neighbour_similarity(tokens: torch.Tensor) -> float:
    """Mean over the rows of ``tokens`` ``[N, D]`` (N >= 2) of the cosine similarity to the most similar other row."""
    unit = F.normalize(tokens.double(), dim=-1)
    similarity = (unit @ unit.T).fill_diagonal_(-math.inf)
    return similarity.max(dim=1).values.mean().item()


def _settings(methods: list[str], keep_ratios: list[float], seed: int) -> list[CompressVisualTokensConfig]:
    """Every setting measured: each method at each keep ratio; pool at the kernels standing for them."""
    settings = []
    for method in methods:
        if method == "pool":
            kernels = dict.fromkeys(max(1, round(r ** -0.5)) for r in keep_ratios)
            settings += [CompressVisualTokensConfig("pool", kernel=k, seed=seed) for k in kernels]
        else:
            settings += [CompressVisualTokensConfig(method, keep_ratio=r, seed=seed) for r in keep_ratios]
    return settings


def _setting(config: CompressVisualTokensConfig) -> str:
    return f"kernel {config.kernel}" if config.method == "pool" else f"keep {config.keep_ratio:g}"


class _Session:
    """The model, captured once, and the forwards that measure it."""

    def __init__(self, model: nn.Module, structure, example: dict, batches: list[dict], seed: int, progress):
        self.model, self.structure, self.example, self.batches, self.seed = model, structure, example, batches, seed
        self.progress = progress
        self.steps, self.total = 0, 0
        self.dense: list[float] = []
        self.inputs: dict = {}  # the batch of the forward in flight

    def tell(self, what: str) -> None:
        self.steps += 1
        if self.progress:
            self.progress(f"profile [{self.steps}/{self.total}] {what}")

    def apply(self, name: str, config):
        """Install pass ``name``'s runtime; it binds itself on the example inputs with the model in eval mode."""
        with eval_mode(self.model):
            return get_pass(name).apply(self.model, self.structure, config, self.example)

    def losses(self, observe: Callable[[], None] | None = None) -> list[float]:
        """One training-mode forward per batch, each right after ``manual_seed(seed)``: the losses."""
        losses = []
        for batch in self.batches:
            self.inputs = batch
            torch.manual_seed(self.seed)
            with torch.no_grad():
                losses.append(model_loss(self.model(**forward_kwargs(self.model, batch)[0])).item())
            if observe:
                observe()
        return losses

    def increase(self, observe: Callable[[], None] | None = None) -> float:
        return fmean([loss - dense for loss, dense in zip(self.losses(observe), self.dense)])

    # ----------------------------------------------------------------------------------- measure
    def measure(self, support: str, methods: list[str], keep_ratios: list[float]):
        """Every measure: (TokenProfile, [BlockProfile]). ``support``: the compressor's verdict on the model."""
        settings = _settings(methods, keep_ratios, self.seed) if support == "ok" else []
        blocks, similarities, notes = self._layers(extra_steps=len(settings) + 2)  # + the two checks
        b = self.structure.boundary
        tokens = TokenProfile(b.kind if b else None, b.tokens_per_image if b else None, keep_ratios,
                              neighbour_similarity=similarities, not_measured=notes)
        if support != "ok":
            tokens.not_measured.append(f"compression: {support}")
        failed = {}
        for config in settings:
            point, failure = self._compress(config)
            if point:
                tokens.points.append(point)
            else:
                failed.setdefault(config.method, []).append((_setting(config), failure))
        for method, failures in failed.items():  # one line for a method that fails alike at every setting
            if len(failures) == sum(c.method == method for c in settings) and len({f for _, f in failures}) == 1:
                tokens.not_measured.append(f"{method}: {failures[0][1]}")
            else:
                tokens.not_measured += [f"{method} {setting}: {failure}" for setting, failure in failures]
        return tokens, blocks

    def _layers(self, extra_steps: int):
        """The dense forwards (losses, changes, similarities), then each skippable block skipped alone."""
        blocks = self.structure.blocks
        try:
            skipper, info = self.apply("skip_layers", SkipLayersConfig())
            reasons = info.details["not_skippable"]
        except ValueError as exc:
            skipper, reasons = None, {b.path: str(exc) for b in blocks}
        try:
            skippable = [i for i, b in enumerate(blocks) if skipper and b.path not in reasons]
            self.total = 1 + len(skippable) + extra_steps
            if skipper:
                skipper.force([])
            changes, similarities, notes = self._dense()
            increases = {}
            for i in skippable:
                self.tell(f"layers: block {i} ({blocks[i].path}) skipped")
                skipper.force([i])
                increases[i] = self.increase()
        finally:
            if skipper:
                skipper.remove()
        profiles = [BlockProfile(i, b.path, b.kind, fmean(changes[i]) if changes[i] else None, increases.get(i),
                                 reasons.get(b.path) if i not in increases else None) for i, b in enumerate(blocks)]
        return profiles, similarities, notes

    def _dense(self):
        """Dense losses, each block's change and each image's neighbour similarity, in one forward per batch."""
        self.tell("dense forward")
        modules = [self.model.get_submodule(b.path) for b in self.structure.blocks]
        with eval_mode(self.model):
            bindings = bind_blocks(self.model, modules, self.example)
        changes = [[] for _ in modules]
        similarities, notes = [], []
        b = self.structure.boundary
        sequence = b is not None and b.positions is not None and b.kind != "cross_attention"

        def record(index, binding):
            def hook(module, args, kwargs, output):
                if module.training:
                    h_in = binding.hidden(args, kwargs)
                    changes[index].append(hidden_change(h_in, pytree.tree_leaves(output)[binding.out_leaf]))
                    if index == 0 and sequence:
                        similarities.extend(self._image_similarities(h_in, notes))
            return hook

        def record_keys(module, args, output):  # cross-attention: the projector's output, per row of keys
            if module.training:
                rows = output.reshape(-1, b.visual_shape[-2], output.shape[-1])
                similarities.extend(neighbour_similarity(row) for row in rows)

        hooks = [m.register_forward_hook(record(i, binding), with_kwargs=True)
                 for i, (m, binding) in enumerate(zip(modules, bindings)) if binding is not None]
        if b is not None and b.kind == "cross_attention" and b.producer_module:
            hooks.append(self.model.get_submodule(b.producer_module).register_forward_hook(record_keys))
        elif not sequence:
            notes.append("neighbour similarity: the visual positions of the merged sequence are unknown")
        if bindings[0] is None and sequence:
            notes.append("neighbour similarity: the first decoder block's hidden-state input was not found")
        try:
            self.dense = self.losses()
        finally:
            for hook in hooks:
                hook.remove()
        return changes, similarities, list(dict.fromkeys(notes))

    def _image_similarities(self, hidden: torch.Tensor, notes: list[str]) -> list[float]:
        """Each image's neighbour similarity in ``hidden`` ``[B, T, D]``, the sequence entering the first block."""
        b = self.structure.boundary
        batch, length = hidden.shape[:2]
        if isinstance(b.positions, Slots):
            mask = b.positions.mask(batch, length, hidden.device)
        else:
            try:
                mask = b.positions(self.inputs).to(hidden.device)
            except ValueError as exc:  # the batch lacks an input the positions are computed from
                notes.append(f"neighbour similarity: {exc}")
                return []
        if tuple(mask.shape) != (batch, length):
            notes.append(f"neighbour similarity: the visual positions {list(mask.shape)} do not match the sequence "
                         f"[{batch}, {length}] entering the first decoder block")
            return []
        images = images_in(mask, self.inputs.get(b.token_input), b.rows_layout, b.image_grids(self.inputs), b.grid,
                           b.cut)
        return [neighbour_similarity(hidden[image.row, list(image.positions)]) for image in images if image.tokens > 1]

    def _compress(self, config: CompressVisualTokensConfig) -> tuple[TokenPoint | None, str | None]:
        """One compression setting's point, or why it could not be measured."""
        self.tell(f"tokens: {config.method} {_setting(config)}")
        try:
            runtime, _ = self.apply("compress_visual_tokens", config)
        except ValueError as exc:
            return None, str(exc)
        counts = []
        try:
            with runtime.trial():  # fails unless the compression took place
                increase = self.increase(lambda: counts.append(runtime.last_kept()))
        except Exception as exc:  # noqa: BLE001 - one setting that fails on this model does not end the profile
            return None, f"{type(exc).__name__}: {first_line(exc)}"
        finally:
            runtime.remove()
        kept_fraction = sum(k for k, _ in counts) / sum(n for _, n in counts)
        pool = config.method == "pool"
        return TokenPoint(config.method, None if pool else config.keep_ratio, config.kernel if pool else None,
                          kept_fraction, increase), None

    # ------------------------------------------------------------------------------------ check
    def check(self, proposal: Proposal, samples: int) -> dict | None:
        """The proposed schedule, measured: ``samples`` draws at the start of its stage, alone and with the
        proposed compression (None when no skipping is proposed)."""
        entries = {}
        for stage in proposal.policy.stages:
            for entry in stage.passes:
                entries.setdefault(entry.name, entry.config)
        if "skip_layers" not in entries:
            return None
        self.tell(f"check: {samples} skip patterns of the proposed schedule")
        skipper, _ = self.apply("skip_layers", entries["skip_layers"])
        runtimes = [skipper]
        try:
            layers, patterns = self._sampled(skipper, samples)
            both = None
            if "compress_visual_tokens" in entries:
                self.tell("check: the same patterns with the proposed compression")
                runtimes.append(self.apply("compress_visual_tokens", entries["compress_visual_tokens"])[0])
                both, _ = self._sampled(skipper, samples)
        finally:
            for runtime in reversed(runtimes):
                runtime.remove()
        token_increase = proposal.compression["loss_increase"] if proposal.compression else None
        interaction = both - (token_increase + layers) if both is not None else None
        return {"samples": samples, "patterns": patterns, "tokens": token_increase, "layers": layers, "both": both,
                "interaction": interaction}

    def _sampled(self, skipper, samples: int) -> tuple[float, list[list[int]]]:
        increases, patterns = [], []
        for step in range(samples):
            skipper.load_state_dict({"progress": 0.0, "step": step, "micro_step": 0})  # the stage start, step `step`
            increases.append(self.increase(lambda: patterns.append(list(skipper.last_skipped))))
        return fmean(increases), patterns
