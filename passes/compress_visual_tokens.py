"""Visual Token Compressor: the decoder sees fewer visual tokens per image.

**Matches** the vision boundary that :func:`stsc.match` found. For a merge that places visual tokens in
the token sequence (``scatter``: written into placeholder positions, by one or several token ids or
a mask input; ``concat``: concatenated with the text) it needs where the visual tokens sit
(``Boundary.positions``: a program over the model inputs, or fixed slots) and the **decoder entry**,
the module whose forward receives the merged sequence. For ``cross_attention`` merges (visual tokens
enter as keys and values) see :class:`KeyValueCompressor`.

**Rewrites**, during training only (in ``eval()`` the model is the dense original): the merged
sequence is **compacted where it enters the decoder stack**. Everything before that point runs as
written (vision encoder, projector, merge, position ids, masks), so no model-specific metadata has
to be recomputed; then

* each image keeps ``k = round(N * keep_ratio)`` of its N visual tokens (:func:`plan`), text tokens
  all stay, padding goes (the positions the model input marking padding, ``Boundary.padding_input``, sets
  to 0, when the call passes it), and every argument of the decoder entry aligned with the sequence (hidden states,
  attention masks of any rank, position ids of any rank such as M-RoPE's ``[3, B, T]``, per-position
  masks) is gathered at the kept positions, as is every argument aligned with the visual tokens
  (features added to them later inside the decoder): kept tokens keep the position ids the entry receives
  (a decoder that numbers positions itself from the sequence length numbers the compacted sequence afresh);
* the decoder's output is expanded back to the full length (each position takes the output of the
  last kept position at or before it), so logits, labels and the loss outside the decoder line up as
  before: every text label is predicted from the nearest kept position before it, exactly as in the
  compacted sequence.

The compacted batch is as long as its longest row's kept positions; shorter rows are filled up at the end
with copies of position ``T - 1`` (which a causal decoder's real positions never see). Where the merging module calls the blocks itself (no decoder entry), the same happens at the first
block's entry, every later block's sequence-aligned arguments are gathered the same way, and the last
block's output is expanded.

``dense_fraction`` > 0 leaves that fraction of the training forwards, drawn per step from the pass's seeded
generator (the same on every rank), dense: every visual token kept (padding still goes), as DualSpeed mixes "slow mode" steps
into token-pruned training, so the model keeps training on the full sequences it sees at inference.

**Methods** (``keep_ratio`` in (0, 1]), per image:

* ``uniform`` (default): evenly spaced tokens, ``floor((i + 0.5) * n / k)``; on the image's 2-D grid
  when it is known (rows x cols chosen with the product closest to ``k``, then the most even coverage);
* ``random``: a random subset per image and step, from a generator seeded by ``(seed, step,
  micro_step)`` so every rank draws the same;
* ``text_guided``: token j scores ``max_t cos(v_j, e_t)`` against every text position t of its sample
  (the merged sequence's non-visual positions); the ``k`` best are kept, in order;
* ``pool``: average pooling over ``kernel x kernel`` grid neighbourhoods (needs the grid; the kept
  count is the pooled grid size, ``keep_ratio`` is ignored); each average sits at its window's first token;
* ``merge``: ToMe-style bipartite merging: tokens alternate into sets A and B, and the A tokens most
  similar (cosine) to their best B partner are averaged into it, repeatedly, until ``k`` remain; each
  average sits at its first member's position.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from stsc.capture import forward_kwargs
from stsc.forwards import ForwardScope, forward_modules
from stsc.layout import Image, images_in
from stsc.positions import Slots
from stsc.registry import PassInfo, register_pass
from stsc.savings import Savings
from stsc.schedules import StepClock, seeded_generator

__all__ = ["METHODS", "CompressVisualTokensConfig", "KeyValueCompressor", "Plan", "RealisedPositions",
           "SequenceCompactor", "apply", "compact", "compact_hidden", "estimate", "expand", "forward_draws",
           "gather_dims", "index_along", "kept_count", "plan", "select", "sequence_dims", "uniform_indices"]

METHODS = ("uniform", "random", "text_guided", "pool", "merge")
SELECTING = ("uniform", "random", "text_guided")  # methods that keep a subset (the others average)


@dataclass(frozen=True)
class CompressVisualTokensConfig:
    method: str = "uniform"
    keep_ratio: float = 0.5  # fraction of each image's visual tokens kept
    kernel: int = 2  # pool only: kernel x kernel neighbourhoods
    seed: int = 0  # the draws: random selection, and which forwards stay dense
    dense_fraction: float = 0.0  # fraction of training forwards, drawn per step, that keep every visual token

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0 < self.keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.kernel < 1:
            raise ValueError(f"kernel must be >= 1, got {self.kernel}")
        if not 0 <= self.dense_fraction < 1:
            raise ValueError(f"dense_fraction must be in [0, 1), got {self.dense_fraction}")


# ------------------------------------------------------------------------------ what each image keeps
def kept_count(tokens: int, config: CompressVisualTokensConfig, grid: tuple[int, int] | None) -> int:
    """How many of an image's ``tokens`` visual tokens the method keeps."""
    if config.method == "pool":
        if grid is None:
            raise ValueError(f"method 'pool' needs each image's 2-D token grid, and an image of {tokens} tokens "
                             f"has none the matcher could derive")
        rows, cols = grid
        return math.ceil(rows / config.kernel) * math.ceil(cols / config.kernel)
    kept = round(tokens * config.keep_ratio)
    if kept < 1:
        raise ValueError(f"keep_ratio {config.keep_ratio} keeps 0 of {tokens} visual tokens per image; at least "
                         f"1 must be kept (keep_ratio >= {0.5 / tokens:.4g})")
    return kept


def _centered(n: int, k: int) -> list[int]:
    return [math.floor((i + 0.5) * n / k) for i in range(k)]


def uniform_indices(tokens: int, kept: int, grid: tuple[int, int] | None) -> list[int]:
    """Exactly ``kept`` evenly spaced token indices: a sub-grid of ``r x c = kept`` rows and columns on the grid
    when one fits (the most even coverage; raster order), else evenly spaced along the raster."""
    shapes = [(r, kept // r) for r in range(1, grid[0] + 1) if kept % r == 0 and kept // r <= grid[1]] \
        if grid is not None and grid[0] * grid[1] == tokens else []
    if not shapes:
        return _centered(tokens, kept)
    rows, cols = grid
    r, c = min(shapes, key=lambda rc: (abs(rc[0] / rows - rc[1] / cols), -rc[0]))
    return [i * cols + j for i in _centered(rows, r) for j in _centered(cols, c)]


def _pool_members(grid: tuple[int, int], kernel: int) -> list[list[int]]:
    rows, cols = grid
    return [[r * cols + c for r in range(top, min(top + kernel, rows)) for c in range(left, min(left + kernel, cols))]
            for top in range(0, rows, kernel) for left in range(0, cols, kernel)]


def _merge_members(features: torch.Tensor, kept: int) -> list[list[int]]:
    """ToMe bipartite merging of ``[N, D]`` down to ``kept`` groups; each group's member indices."""
    members = [[i] for i in range(features.shape[0])]
    x = features.detach()
    while len(members) > kept:
        a, b = x[::2], x[1::2]
        remove = min(len(members) - kept, a.shape[0])
        similarity = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
        best, partner = similarity.max(dim=-1)
        merged = set(best.argsort(descending=True)[:remove].tolist())
        groups_a, groups_b = members[::2], [list(g) for g in members[1::2]]
        for i in sorted(merged):
            groups_b[int(partner[i])] += groups_a[i]
        members = [g for i, g in enumerate(groups_a) if i not in merged] + groups_b
        x = torch.stack([features.detach()[g].mean(dim=0) for g in members])
    return sorted(sorted(g) for g in members)


def select(features: torch.Tensor, config: CompressVisualTokensConfig, grid: tuple[int, int] | None, kept: int,
           generator: torch.Generator | None = None, text: torch.Tensor | None = None) -> list[list[int]]:
    """What one image keeps: ``kept`` groups of its token indices (``features``: ``[N, D]``), in position order.

    Selecting methods give one-token groups; ``pool`` and ``merge`` give the tokens each kept token averages.
    """
    tokens = features.shape[0]
    if config.method == "uniform":
        return [[i] for i in uniform_indices(tokens, kept, grid)]
    if config.method == "random":
        return [[i] for i in torch.rand(tokens, generator=generator).argsort()[:kept].sort().values.tolist()]
    if config.method == "text_guided":
        scores = (F.normalize(features.detach(), dim=-1) @ F.normalize(text.detach(), dim=-1).T).max(dim=-1).values
        return [[i] for i in scores.topk(kept).indices.sort().values.tolist()]
    if config.method == "pool":
        return _pool_members(grid, config.kernel)
    return _merge_members(features, kept)


# ----------------------------------------------------------------------------------- the batch's plan
@dataclass
class Plan:
    """How one batch's merged sequence ``[B, T, D]`` is compacted to ``[B, T', D]`` and expanded back.

    A row keeps its text positions and its kept visual tokens, and drops the rest and its padding; ``T'`` is the
    longest row's kept count, and shorter rows are filled up with copies of position ``T - 1`` (padding in a
    right-padded row; a causal decoder's real positions never see what comes after them). Averaging methods
    (``pool``, ``merge``) put the mean of a group of visual tokens in the slot of its first member: ``groups``
    lists them as flat index tensors.
    """

    index: torch.Tensor  # [B, T'] source position of each kept slot (fillers: position T - 1)
    restore: torch.Tensor  # [B, T] the kept slot each original position takes its output from
    visual: torch.Tensor  # [B, T] bool: the visual positions
    kept_visual: torch.Tensor  # ranks (row-major order among the visual positions) of the kept visual tokens
    groups: tuple[torch.Tensor, ...] | None  # (rows, slots, kept_at, member_ranks, member_group) of averaged slots
    lengths: torch.Tensor  # [B] kept positions of each row (padding not counted)
    tokens: int  # visual tokens in the batch
    kept: int  # visual tokens kept

    @property
    def length(self) -> int:
        """Positions the decoder sees per row (``T'``)."""
        return self.index.shape[1]

    @property
    def drops(self) -> bool:
        """Whether the sequence changes: a visual token is dropped or averaged, or removing padding shortens it."""
        return self.kept < self.tokens or self.length < self.restore.shape[1]

    @classmethod
    def keep_all(cls, visual: torch.Tensor, real: torch.Tensor | None = None) -> "Plan":
        """The plan of a dense forward: every visual token kept, padding (``real`` False) dropped."""
        keep = torch.ones_like(visual) if real is None else real.clone()
        return _compaction(keep, visual, [], int(visual.sum()))


def plan(hidden: torch.Tensor, visual: torch.Tensor, images: list[Image], config: CompressVisualTokensConfig,
         generator: torch.Generator | None = None, real: torch.Tensor | None = None) -> Plan:
    """Which positions of ``hidden`` ``[B, T, D]`` to keep, given its visual positions and their images; ``real``
    (``[B, T]`` bool, optional): the positions that are not padding (the others are dropped too)."""
    text_positions = ~visual if real is None else ~visual & real
    rows, kept_positions, averaged = [], [], []  # averaged: (row, position of the first member, members)
    for image in images:
        positions = list(image.positions)
        count = kept_count(len(positions), config, image.grid)
        text = hidden[image.row][text_positions[image.row]] if config.method == "text_guided" else None
        for group in select(hidden[image.row, positions], config, image.grid, count, generator, text):
            rows.append(image.row)
            kept_positions.append(positions[group[0]])
            if len(group) > 1:
                averaged.append((image.row, positions[group[0]], [positions[i] for i in group]))
    keep = text_positions.clone()
    keep[rows, kept_positions] = True
    return _compaction(keep, visual, averaged, len(rows))


def _compaction(keep: torch.Tensor, visual: torch.Tensor, averaged: list, kept: int) -> Plan:
    """The :class:`Plan` that keeps the positions ``keep`` ``[B, T]`` (``kept`` of them visual)."""
    batch, length = visual.shape
    device = visual.device
    lengths = keep.sum(dim=1)
    size = int(lengths.max()) if batch else 0
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :size]
    valid = torch.arange(size, device=device) < lengths[:, None]
    index = torch.where(valid, order, length - 1)
    restore = (keep.long().cumsum(dim=1) - 1).clamp(min=0)
    tokens = int(visual.sum())
    rank = torch.full((batch, length), -1, dtype=torch.long, device=device)
    rank[visual] = torch.arange(tokens, device=device)
    slot_ranks = rank.gather(1, index)[valid]
    kept_visual = slot_ranks[slot_ranks >= 0]
    return Plan(index, restore, visual, kept_visual, _groups(averaged, rank, restore, kept_visual), lengths, tokens,
                kept)


def _groups(averaged, rank: torch.Tensor, restore: torch.Tensor, kept_visual: torch.Tensor):
    """Flat index tensors of the averaged groups (see :class:`Plan`), or None without any."""
    if not averaged:
        return None
    ranks, slots = rank.tolist(), restore.tolist()
    position_in_kept = {r: i for i, r in enumerate(kept_visual.tolist())}
    device = rank.device
    members = [(group, ranks[row][p]) for group, (row, _, positions) in enumerate(averaged) for p in positions]
    return (torch.tensor([row for row, _, _ in averaged], device=device),
            torch.tensor([slots[row][first] for row, first, _ in averaged], device=device),
            torch.tensor([position_in_kept[ranks[row][first]] for row, first, _ in averaged], device=device),
            torch.tensor([r for _, r in members], device=device),
            torch.tensor([g for g, _ in members], device=device))


def _means(values: torch.Tensor, groups) -> torch.Tensor:
    """The mean of each averaged group's members, from ``values`` ``[visual tokens, ...]`` in rank order."""
    member_ranks, member_group = groups[3], groups[4]
    count = len(groups[0])
    sums = values.new_zeros(count, *values.shape[1:]).index_add(0, member_group, values[member_ranks])
    sizes = torch.bincount(member_group, minlength=count).to(values.dtype)
    return sums / sizes.reshape(-1, *[1] * (values.dim() - 1))


def compact(value, plan_: Plan, batch: int, length: int):
    """Gather a decoder-entry argument at the kept positions, if it is aligned with the sequence.

    Aligned: a batch dimension (size ``batch``, or 1 to be broadcast) followed by dimensions of size
    ``length`` (:func:`sequence_dims`; all of them are gathered: a ``[B, 1, T, T]`` mask keeps kept rows and
    columns); or a first dimension counting the batch's visual tokens (features added to them later), which
    keeps the kept ones (averaged like the hidden states for averaging methods). Anything else is returned as is.
    """
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if value.shape[0] == plan_.tokens and value.shape[0] not in (batch, 1):
        kept = value[plan_.kept_visual]
        if plan_.groups is None or not value.is_floating_point():
            return kept
        return kept.index_put((plan_.groups[2],), _means(value, plan_.groups))
    found = sequence_dims(value.shape, batch, length)
    return value if found is None else gather_dims(value, plan_.index, *found)


def sequence_dims(shape, batch, length, same=operator.eq) -> tuple[int, list[int]] | None:
    """``(batch_dim, dims)`` of a tensor of ``shape`` aligned with the sequence: dimension 0 or 1 of size ``batch``
    (the later one when both are: M-RoPE's ``[3, B, T]`` at batch 3), else of size 1 (broadcast), followed by the
    dimensions ``dims`` of size ``length``; None when it is not aligned. ``same`` compares two sizes."""
    candidates = [(d, [e for e in range(d + 1, len(shape)) if same(shape[e], length)])
                  for d in range(min(2, len(shape) - 1))]
    candidates = [(d, dims) for d, dims in candidates if dims]
    exact = [(d, dims) for d, dims in candidates if same(shape[d], batch)]
    return exact[-1] if exact else next(((d, dims) for d, dims in candidates if same(shape[d], 1)), None)


def gather_dims(x: torch.Tensor, index: torch.Tensor, batch_dim: int, dims: list[int]) -> torch.Tensor:
    """``x`` gathered at ``index`` ``[B, T']`` along each of ``dims`` (batch at ``batch_dim``, broadcast from 1)."""
    if x.shape[batch_dim] != index.shape[0]:
        x = x.expand(*x.shape[:batch_dim], index.shape[0], *x.shape[batch_dim + 1:])
    for dim in dims:
        x = x.gather(dim, index_along(x, index, batch_dim, dim))
    return x


def index_along(x: torch.Tensor, index: torch.Tensor, batch_dim: int, dim: int) -> torch.Tensor:
    """``index`` ``[B, T']`` shaped to gather (or scatter) ``x`` along ``dim``."""
    shape = [1] * x.dim()
    shape[batch_dim], shape[dim] = index.shape
    target = list(x.shape)
    target[dim] = index.shape[1]
    return index.reshape(shape).expand(target)


def compact_hidden(hidden: torch.Tensor, plan_: Plan) -> torch.Tensor:
    """The merged sequence at the kept positions; averaged slots hold the mean of their members."""
    out = gather_dims(hidden, plan_.index, 0, [1])
    if plan_.groups is None:
        return out
    means = _means(hidden[plan_.visual], plan_.groups)
    return out.index_put((plan_.groups[0], plan_.groups[1]), means.to(out.dtype))


def expand(value, plan_: Plan, batch: int):
    """A decoder output ``[B, T', ...]`` back to ``[B, T, ...]``: each position takes its kept slot's value."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == batch \
            and value.shape[1] == plan_.length:
        return gather_dims(value, plan_.restore, 0, [1])
    return value


# ------------------------------------------------------------------------------------- runtimes
def forward_draws(config: CompressVisualTokensConfig, step: int, micro_step: int) -> tuple[bool, torch.Generator]:
    """A training forward's draws: whether it runs dense (``dense_fraction`` > 0: the first draw of the generator
    seeded by ``(seed, step, micro step)`` decides) and that generator, which draws the rest (``random``)."""
    generator = seeded_generator(config.seed, step, micro_step)
    dense = bool(config.dense_fraction) and float(
        torch.rand((), generator=generator, dtype=torch.float64)) < config.dense_fraction
    return dense, generator


class _Runtime:
    """What both compressor runtimes share: the step clock seeding their draws, and their hooks."""

    config: CompressVisualTokensConfig
    clock: StepClock
    _hooks: list
    _trying = False  # in sparsify's trial step, which always compresses

    def _draws(self) -> torch.Generator | None:
        """This training forward's generator (:func:`forward_draws`); None when the forward is drawn dense."""
        dense, generator = forward_draws(self.config, *self.clock.tick())
        return None if dense and not self._trying else generator

    def set_progress(self, *, step: int | None = None, epoch: float | None = None) -> None:
        if step is not None:
            self.clock.set_step(step)

    def state_dict(self) -> dict:
        return self.clock.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.clock.load_state_dict(state)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    @contextlib.contextmanager
    def trial(self):
        """Around sparsify's trial step: fail unless the compression took place."""
        self.last_plan, self._trying = None, True
        try:
            yield
        finally:
            self._trying = False
        if self.last_plan is None:
            raise ValueError(f"no compression took place in a training forward: {self._trial_expectation}")


@dataclass
class RealisedPositions:
    """Decoder sequence positions over the training forwards of a stage, summed over forwards (batch x length).

    ``seen`` is what the decoder received: each batch as long as its longest row's kept positions, the shortest
    a padded batch can be (with a padding mask; without one, padding counts as kept). ``kept``: the rows' kept
    positions themselves, without the fill that pads shorter rows up to the longest (what a padding-free,
    packed batch would hold).
    """

    forwards: int = 0
    padded: int = 0  # the caller's padded batches
    seen: int = 0  # what the decoder saw
    kept: int = 0  # the rows' kept positions (text, kept visual tokens; no padding)

    def add(self, plan_: Plan) -> None:
        batch, length = plan_.restore.shape
        self.forwards += 1
        self.padded += batch * length
        self.seen += batch * (plan_.length if plan_.drops else length)
        self.kept += int(plan_.lengths.sum())

    def format(self) -> str:
        if not self.forwards:
            return "decoder positions: no training forward yet"
        return (f"decoder positions over {self.forwards} training forwards: {self.seen} of {self.padded} padded "
                f"({100 * self.seen / self.padded:.1f} %); rows' kept positions {self.kept} "
                f"(seen / kept {self.seen / max(self.kept, 1):.3f})")


class SequenceCompactor(_Runtime):
    """Module lowering of the pass for ``scatter`` / ``concat`` merges: hooks on the model (to read its
    inputs; on its backbone too, when a forward starts there: :mod:`stsc.forwards`), on the decoder entry (compact
    its arguments) and on the decoder exit (expand its output).

    ``hidden_path``: where the merged sequence sits among the entry's arguments (a pytree key path of
    ``(args, kwargs)``), found by one run of the example inputs. Where the matcher found the input marking padding
    (``boundary.padding_input``) and a call passes it, padding positions are dropped with the visual tokens.
    :meth:`realised` sums what the decoder saw.
    """

    _trial_expectation = "the decoder entry never received the merged sequence"

    def last_kept(self) -> tuple[int, int]:
        """(visual tokens kept, visual tokens) in the last training forward."""
        return self.last_plan.kept, self.last_plan.tokens

    def __init__(self, model: nn.Module, boundary, config: CompressVisualTokensConfig, starts: list[nn.Module],
                 entries: list[nn.Module], exit_module: nn.Module, hidden_path):
        self.config, self.boundary = config, boundary
        self.clock = StepClock()
        self.last_plan: Plan | None = None  # the last training forward's plan
        self._realised = RealisedPositions()
        self._model, self._entries, self._hidden_path = model, entries, hidden_path
        self._inputs: dict = {}
        self._plan: Plan | None = None
        self._memo: dict[int, object] = {}
        self._hooks = [ForwardScope(starts, self._read_inputs, self._forget)]  # the model, or its backbone
        self._hooks += [entry.register_forward_pre_hook(self._compact_arguments, with_kwargs=True) for entry in entries]
        self._hooks.append(exit_module.register_forward_hook(self._expand_output))

    def _read_inputs(self, module, args, kwargs):
        self._inputs = kwargs if module.training else {}

    def _forget(self):
        """After each model forward: the decoder entry called on its own is not compacted."""
        self._inputs, self._plan, self._memo = {}, None, {}

    def visual_mask(self, batch: int, length: int, device) -> torch.Tensor:
        positions = self.boundary.positions
        if isinstance(positions, Slots):
            return positions.mask(batch, length, device)
        mask = positions(self._inputs).to(device)
        if tuple(mask.shape) != (batch, length):
            raise ValueError(f"compress_visual_tokens: the visual positions {tuple(mask.shape)} do not match the "
                             f"merged sequence [{batch}, {length}] entering the decoder")
        return mask

    def real_mask(self, visual: torch.Tensor) -> torch.Tensor | None:
        """The positions of the batch that are not padding, from the call's padding mask input; None where there is
        no such input, or no padding."""
        name = self.boundary.padding_input
        value = self._inputs.get(name) if name else None
        if not isinstance(value, torch.Tensor) or value.shape != visual.shape:
            return None
        real = value.to(visual.device).bool()
        padded, padded_visual = torch.stack([(~real).any(), (visual & ~real).any()]).tolist()
        if padded_visual:
            raise ValueError(f"compress_visual_tokens: the padding mask {name!r} marks visual positions as padding")
        return real if padded else None

    def realised(self) -> RealisedPositions:
        """Decoder positions seen, padded and kept over this stage's training forwards so far."""
        return dataclasses.replace(self._realised)

    @torch.compiler.disable
    def _compact_arguments(self, module, args, kwargs):
        if not self._model.training or not self._inputs:
            return None
        first = self._plan is None
        if first:
            hidden = _leaf(args, kwargs, self._hidden_path)
            batch, length = hidden.shape[:2]
            visual = self.visual_mask(batch, length, hidden.device)
            real = self.real_mask(visual)
            generator = self._draws()
            if generator is None:
                self._plan = Plan.keep_all(visual, real)
            else:
                images = images_in(visual, self._inputs.get(self.boundary.token_input), self.boundary.rows_layout,
                                   self.boundary.image_grids(self._inputs), self.boundary.grid, self.boundary.cut)
                self._plan = plan(hidden.detach(), visual, images, self.config, generator, real)
            self.last_plan, self._shape = self._plan, (batch, length)
            self._realised.add(self._plan)
        if not self._plan.drops:
            return None  # the entry runs on the sequence as it is (a dense forward without padding to remove)
        if first:
            args, kwargs = _replace_leaf(args, kwargs, self._hidden_path, compact_hidden(hidden, self._plan))
        batch, length = self._shape

        def gather(value):
            if not isinstance(value, torch.Tensor):
                return value
            if id(value) not in self._memo:
                self._memo[id(value)] = (value, compact(value, self._plan, batch, length))
            return self._memo[id(value)][1]

        return pytree.tree_map(gather, (args, kwargs))

    @torch.compiler.disable
    def _expand_output(self, module, args, output):
        if self._plan is None or not self._plan.drops or not self._model.training:
            return None
        return pytree.tree_map(lambda value: expand(value, self._plan, self._shape[0]), output)


def _leaf(args, kwargs, path):
    leaves = pytree.tree_flatten_with_path((args, kwargs))[0]
    return next(value for key, value in leaves if key == path)


def _replace_leaf(args, kwargs, path, new):
    leaves, spec = pytree.tree_flatten_with_path((args, kwargs))
    return pytree.tree_unflatten([new if key == path else value for key, value in leaves], spec)


def _merged_shape(boundary, inputs: dict) -> tuple:
    """The merged sequence's shape ``[B, T, D]`` in a forward on ``inputs`` (shaped like the example the boundary was
    matched on, or not): ``B`` and ``T`` those of the visual positions; a ``cat`` merge's ``T`` is None (any)."""
    if isinstance(boundary.positions, Slots):
        return inputs[boundary.token_input].shape[0], None, boundary.merged_shape[-1]
    return (*boundary.positions(inputs).shape, boundary.merged_shape[-1])


def _hidden_path(model: nn.Module, entry: nn.Module, example_inputs: dict, shape: tuple):
    """Where a tensor of the merged sequence's ``shape`` (None: any size) sits among ``entry``'s arguments (one run)."""
    seen = []
    handle = entry.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)) if not seen else None,
                                             with_kwargs=True)
    try:
        with torch.no_grad():
            model(**forward_kwargs(model, example_inputs)[0])
    finally:
        handle.remove()
    if not seen:
        raise ValueError("the decoder entry did not run on the example inputs")
    for path, value in pytree.tree_flatten_with_path(seen[0])[0]:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() == len(shape) \
                and all(want in (None, size) for want, size in zip(shape, value.shape)):
            return path
    raise ValueError(f"no argument of the decoder entry has the merged sequence's shape {list(shape)}")


class KeyValueCompressor(_Runtime):
    """Runtime for ``cross_attention`` merges: the visual tokens reach the decoder as keys and values.

    The projector's output is recorded (not changed); where it enters the module that holds the
    decoder blocks, as an argument ``[..., N, D]``, it is replaced by ``[..., k, D]`` (the kept tokens
    of each row of N, e.g. each image tile), and every other argument aligned with the keys (a mask
    whose last dimension is the per-sample key length, like Mllama's expanded cross-attention mask)
    keeps the same positions. The decoder's own sequence is unchanged.
    """

    _trial_expectation = "no module around the decoder blocks received the visual keys"

    def last_kept(self) -> tuple[int, int]:
        """(visual tokens kept, visual tokens) in the last training forward: kept key indices per row."""
        return self.last_plan.numel(), self.last_plan.shape[0] * self.tokens

    def __init__(self, model: nn.Module, boundary, config: CompressVisualTokensConfig, blocks: list[str]):
        self.config, self.boundary = config, boundary
        self.last_plan: torch.Tensor | None = None  # the last training forward's kept key indices
        self.tokens = boundary.visual_shape[-2]
        self.kept = kept_count(self.tokens, config, None)
        self.clock = StepClock()
        self._source: tuple[int, int] | None = None
        self._model = model
        modules = dict(model.named_modules())
        parts = blocks[0].split(".")
        holders = [".".join(parts[:i]) for i in range(1, len(parts))]  # the modules around the first block
        self._hooks = [modules[boundary.producer_module].register_forward_hook(self._record)]
        self._hooks += [modules[path].register_forward_pre_hook(self._compress_keys, with_kwargs=True)
                        for path in holders]

    @torch.compiler.disable
    def _record(self, module, args, output):
        self._source = (output.data_ptr(), output.numel()) if self._model.training else None

    @torch.compiler.disable
    def _compress_keys(self, module, args, kwargs):
        if self._source is None:
            return None
        name = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)
                     and (v.data_ptr(), v.numel()) == self._source), None)
        if name is None:
            return None
        self._source = None  # once per forward: the replacement no longer matches
        states = kwargs[name]
        rows = states.reshape(-1, *states.shape[-2:])
        generator = self._draws()
        if generator is None:  # a dense forward: every key kept
            self.last_plan = torch.arange(self.tokens, device=states.device).expand(rows.shape[0], -1)
            return None
        indices = torch.tensor([[group[0] for group in select(row, self.config, None, self.kept, generator)]
                                for row in rows], device=states.device)
        self.last_plan = indices
        new = dict(kwargs)
        new[name] = rows.gather(1, indices.unsqueeze(-1).expand(-1, -1, rows.shape[-1])).reshape(
            *states.shape[:-2], self.kept, states.shape[-1])
        keys_per_batch = rows.shape[0] * self.tokens
        for key, value in kwargs.items():
            if key != name and isinstance(value, torch.Tensor) and value.dim() >= 2 \
                    and value.shape[0] * value.shape[-1] == keys_per_batch:
                new[key] = _select_keys(value, indices, self.tokens)
        return args, new


def _select_keys(value: torch.Tensor, indices: torch.Tensor, tokens: int) -> torch.Tensor:
    """Keep, along the last dimension of ``value`` ``[B, ..., rows_per_sample * tokens]``, the key positions
    ``indices`` ``[B * rows_per_sample, kept]`` (row-major: key ``r * tokens + i``)."""
    batch = value.shape[0]
    per_sample = indices.reshape(batch, -1, indices.shape[-1])
    offsets = torch.arange(per_sample.shape[1], device=value.device)[None, :, None] * tokens
    flat = (per_sample + offsets).reshape(batch, *[1] * (value.dim() - 2), -1)
    return value.gather(-1, flat.expand(*value.shape[:-1], flat.shape[-1]))


# ----------------------------------------------------------------------------------- the pass
def _per_image(boundary) -> list[int]:
    tokens = boundary.tokens_per_image
    return list(tokens) if isinstance(tokens, list) else [tokens] * (boundary.images or 0)


def estimate(structure, config: CompressVisualTokensConfig) -> Savings:
    """Decoder positions removed per sample, at the example's images."""
    b = structure.boundary
    if b is None or b.kind == "cross_attention" or b.tokens_per_image is None or not b.images:
        return Savings()  # cross-attention: the keys shrink, the decoder sequence does not
    try:
        removed = sum(n - kept_count(n, config, b.grid) for n in _per_image(b))
    except ValueError:
        return Savings()
    removed *= 1 - config.dense_fraction
    return Savings(tokens_removed=removed / structure.batch if structure.batch else removed)


def check(structure) -> str | None:
    """Why the pass cannot work on ``structure`` (None when it can)."""
    b = structure.boundary
    if b is None:
        return "; ".join(n for n in structure.notes if n.startswith(("no vision boundary", "no token input"))) \
            or "no vision boundary found"
    if not structure.blocks:
        return "no decoder blocks found"
    if b.kind == "cross_attention":
        if b.producer_module is None or not b.visual_shape:
            return "the module producing the visual keys of the cross-attention merge was not found"
        return None
    if b.positions is None:
        return (f"the visual positions of the merged sequence could not be derived for this {b.kind} merge "
                f"({b.merge_op}): " + "; ".join(n for n in structure.notes if n.startswith("visual positions")))
    return None


@register_pass("compress_visual_tokens", CompressVisualTokensConfig, estimate, check)
def apply(model: nn.Module, structure, config: CompressVisualTokensConfig, example_inputs: dict):
    """Install the compressor at ``structure.boundary``; return the runtime and what was done."""
    problem = check(structure)
    if problem:
        raise ValueError(problem)
    b = structure.boundary
    if b.kind == "cross_attention":
        return _apply_cross_attention(model, structure, config)
    images = _example_images(b, example_inputs)
    kept = [kept_count(image.tokens, config, image.grid) for image in images]  # refuses what cannot be compressed
    modules = dict(model.named_modules())
    if b.decoder_entry is not None:
        entries, exit_module, where = [modules[b.decoder_entry]], modules[b.decoder_entry], b.decoder_entry
    else:
        entries = [modules[block.path] for block in structure.blocks]
        exit_module, where = entries[-1], f"each decoder block ({structure.blocks[0].path} ...)"
    hidden_path = _hidden_path(model, entries[0], example_inputs, _merged_shape(b, example_inputs))
    starts = forward_modules(model, structure)
    compactor = SequenceCompactor(model, b, config, starts, entries, exit_module, hidden_path)
    padding = f"where {b.padding_input} is 0" if b.padding_input else "no (no padding mask found)"
    return compactor, PassInfo("compress_visual_tokens", 1, {
        "boundary": b.kind, "visual_positions": getattr(b.positions, "code", repr(b.positions)),
        "compacted_at": where, "padding_removed": padding, "method": config.method,
        "tokens_per_image": b.tokens_per_image, "kept_per_image": kept[0] if len(set(kept)) == 1 else kept,
    })


def _example_images(boundary, example_inputs: dict) -> list[Image]:
    """The images of the example inputs, laid out as the compactor will see them."""
    if isinstance(boundary.positions, Slots):
        mask = boundary.positions.mask(*boundary.merged_shape[:2])
    else:
        mask = boundary.positions(example_inputs)
    return images_in(mask, example_inputs.get(boundary.token_input), boundary.rows_layout,
                     boundary.image_grids(example_inputs), boundary.grid, boundary.cut)


def _apply_cross_attention(model: nn.Module, structure, config: CompressVisualTokensConfig):
    b = structure.boundary
    if config.method not in ("uniform", "random"):
        raise ValueError(f"method {config.method!r} is not supported for cross_attention merges; use uniform "
                         f"or random")
    compressor = KeyValueCompressor(model, b, config, [block.path for block in structure.blocks])
    return compressor, PassInfo("compress_visual_tokens", 1, {
        "boundary": b.kind, "producer_module": b.producer_module, "method": config.method,
        "keys_per_row": compressor.tokens, "kept_per_row": compressor.kept})
