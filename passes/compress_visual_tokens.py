"""Visual Token Compressor: keep fewer visual tokens where they enter the language model.

**Matches** the vision boundary that :func:`stsc.match` found: the module producing the visual-token
tensor (the projector) and the merge kind. Supported merges: ``scatter`` (features written into
placeholder positions of the token sequence), ``concat`` (features concatenated with the text
embeddings) and ``cross_attention`` (features used as keys/values of cross-attention layers; see
:class:`KeyValueCompressor`: the keys and every mask aligned with them shrink, methods ``uniform``
and ``random``).

**Rewrites**, during training only (in ``eval()`` the model is the dense original):

* the projector's output ``[..., N, D]`` per image becomes ``[..., k, D]`` with ``k = round(N * keep_ratio)``
  (a forward hook on the producer module, so the compression is part of what runs, and of what any
  later capture sees, rather than a node spliced into a graph specialized to N tokens);
* for ``scatter`` merges, every input aligned with the token sequence (``input_ids``,
  ``attention_mask``, ``labels``, ``token_type_ids``... any input shaped like the token ids) loses the
  last ``N - k`` positions of each image's placeholder run, so the model scatters the ``k`` kept
  features into the ``k`` remaining placeholders. Placeholders are interchangeable (one token id, and
  labels of ignore-index), so no text token is dropped, shifted or unmasked. The caller's tensors are
  never modified; new ones are passed on. For ``concat`` merges the sequence shortens by itself.

**Methods** (``keep_ratio`` in (0, 1]):

* ``uniform`` (default): evenly spaced tokens, ``floor((i + 0.5) * n / k)``; on the 2-D grid when it
  is known (rows x cols chosen with the product closest to ``k``, then the most even coverage), so the
  kept tokens still cover the image.
* ``random``: a random subset per image and step, from a generator seeded by ``(seed, step,
  micro_step)`` so every rank draws the same.
* ``text_guided``: token j of an image is scored ``max_t cos(v_j, e_t)``, the highest cosine
  similarity between the projected visual token ``v_j`` and the input embedding ``e_t`` of any text
  token t of the same sample (every non-placeholder token); the ``k`` best are kept, in order.
* ``pool``: average pooling over ``kernel x kernel`` grid neighbourhoods (needs the grid; the
  kept count is the pooled grid size, ``keep_ratio`` is ignored).
* ``merge``: ToMe-style bipartite merging: tokens alternate into sets A and B, and the A tokens most
  similar (cosine) to their best B partner are averaged into it, repeatedly, until ``k`` remain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stsc.match import placeholder_runs
from stsc.registry import PassInfo, register_pass
from stsc.savings import Savings
from stsc.schedules import StepClock, seeded_generator

__all__ = ["METHODS", "CompressVisualTokensConfig", "KeyValueCompressor", "VisualTokenCompressor", "apply", "compress",
           "estimate", "kept_count", "selection", "uniform_indices"]

METHODS = ("uniform", "random", "text_guided", "pool", "merge")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class CompressVisualTokensConfig:
    method: str = "uniform"
    keep_ratio: float = 0.5  # fraction of each image's visual tokens kept
    kernel: int = 2  # pool only: kernel x kernel neighbourhoods
    seed: int = 0  # random only

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0 < self.keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.kernel < 1:
            raise ValueError(f"kernel must be >= 1, got {self.kernel}")


# ------------------------------------------------------------------------------ token selection
def kept_count(tokens: int, config: CompressVisualTokensConfig, grid: tuple[int, int] | None) -> int:
    """How many of ``tokens`` visual tokens per image the method keeps."""
    if config.method == "pool":
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
    """Evenly spaced token indices; on the grid when known (raster order)."""
    if grid is None or grid[0] * grid[1] != tokens:
        return _centered(tokens, kept)
    rows, cols = grid
    shapes = [(r, min(max(round(kept / r), 1), cols)) for r in range(1, rows + 1)]
    r, c = min(shapes, key=lambda rc: (abs(rc[0] * rc[1] - kept), abs(rc[0] / rows - rc[1] / cols), -rc[0]))
    return [i * cols + j for i in _centered(rows, r) for j in _centered(cols, c)]


def _select(features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return features.gather(1, indices.unsqueeze(-1).expand(-1, -1, features.shape[-1]))


def _merge(features: torch.Tensor, kept: int) -> torch.Tensor:
    x = features
    while x.shape[1] > kept:
        a, b = x[:, ::2], x[:, 1::2]
        remove = min(x.shape[1] - kept, a.shape[1])
        similarity = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(1, 2)
        best, partner = similarity.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        merged, kept_a = order[:, :remove], order[:, remove:].sort(dim=-1).values
        sums = b.clone().scatter_add(1, partner.gather(1, merged).unsqueeze(-1).expand(-1, -1, x.shape[-1]),
                                     _select(a, merged))
        counts = torch.ones(b.shape[:2], dtype=x.dtype, device=x.device).scatter_add(
            1, partner.gather(1, merged), torch.ones(merged.shape, dtype=x.dtype, device=x.device))
        x = torch.cat([_select(a, kept_a), sums / counts.unsqueeze(-1)], dim=1)
    return x


SELECTING = ("uniform", "random", "text_guided")  # methods that keep a subset (the others average)


def selection(features: torch.Tensor, config: CompressVisualTokensConfig, grid: tuple[int, int] | None, kept: int,
              generator: torch.Generator | None = None,
              text_embeddings: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Indices ``[images, kept]`` (ascending) of the tokens a selecting method keeps from ``[images, N, D]``."""
    images, tokens, _ = features.shape
    if config.method == "uniform":
        return torch.tensor(uniform_indices(tokens, kept, grid), device=features.device).expand(images, -1)
    if config.method == "random":
        return torch.rand(images, tokens, generator=generator).argsort(dim=-1)[:, :kept].sort(dim=-1).values.to(
            features.device)
    scores = torch.stack([(F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).T).max(dim=-1).values
                          for v, t in zip(features, text_embeddings)])
    return scores.topk(kept, dim=-1).indices.sort(dim=-1).values


def compress(features: torch.Tensor, config: CompressVisualTokensConfig, grid: tuple[int, int] | None,
             kept: int, generator: torch.Generator | None = None,
             text_embeddings: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``[images, N, D] -> [images, kept, D]`` by ``config.method``."""
    if config.method in SELECTING:
        return _select(features, selection(features, config, grid, kept, generator, text_embeddings))
    if config.method == "pool":
        images, _, dim = features.shape
        rows, cols = grid
        x = features.transpose(1, 2).reshape(images, dim, rows, cols)
        x = F.avg_pool2d(x, config.kernel, ceil_mode=True)
        return x.flatten(2).transpose(1, 2)
    return _merge(features, kept)


# ------------------------------------------------------------------------------------- runtime
class _Runtime:
    """What both compressor runtimes share: the step clock seeding their draws, and their hooks."""

    clock: StepClock
    _hooks: list

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


class VisualTokenCompressor(_Runtime):
    """Runtime of the pass: hooks on the model (sequence shrink) and on the producer (features)."""

    def __init__(self, model: nn.Module, boundary, config: CompressVisualTokensConfig):
        self.config, self.boundary = config, boundary
        self.tokens = boundary.tokens_per_image
        self.kept = kept_count(self.tokens, config, boundary.grid)
        self.clock = StepClock()
        self._input_ids: torch.Tensor | None = None
        modules = dict(model.named_modules())
        self._embedding = modules.get(boundary.token_embedding)
        self._hooks = [model.register_forward_pre_hook(self._shrink_inputs, with_kwargs=True),
                       modules[boundary.producer_module].register_forward_hook(self._compress_output)]
        self._model = model

    @torch.compiler.disable
    def _shrink_inputs(self, model, args, kwargs):
        if not model.training:
            return None
        b = self.boundary
        self._input_ids = kwargs.get(b.token_input)
        if self._input_ids is None and (b.kind == "scatter" or self.config.method == "text_guided"):
            raise ValueError(f"compress_visual_tokens needs `{b.token_input}` as a keyword argument of the model "
                             f"call (positional arguments: {len(args)}, keywords: {', '.join(kwargs) or 'none'})")
        if b.kind != "scatter":
            return None
        keep = self._placeholder_keep_mask(self._input_ids)
        lengths = keep.sum(dim=1)
        new = dict(kwargs)
        for name in b.aligned_inputs:
            value = kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.shape == keep.shape:
                new[name] = _pack(value, keep, lengths)
        return args, new

    def _placeholder_keep_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """True everywhere except the last ``N - k`` positions of each placeholder run."""
        keep = torch.ones_like(input_ids, dtype=torch.bool)
        for row, start, run in placeholder_runs(input_ids, self.boundary.placeholder_id):
            if run % self.tokens:
                raise ValueError(f"a run of {run} image placeholders (token {self.boundary.placeholder_id}) is "
                                 f"not a whole number of images of {self.tokens} visual tokens")
            for end in range(start + run, start, -self.tokens):
                keep[row, end - (self.tokens - self.kept):end] = False
        return keep

    @torch.compiler.disable
    def _compress_output(self, module, args, output):
        if not self._model.training:  # the model's mode decides, as in _shrink_inputs: never one without the other
            return None
        dim = output.shape[-1]
        features = output.reshape(-1, self.tokens, dim)
        generator = seeded_generator(self.config.seed, *self.clock.tick())
        text = self._text_embeddings(features.shape[0]) if self.config.method == "text_guided" else None
        compressed = compress(features, self.config, self.boundary.grid, self.kept, generator, text)
        if output.dim() == 2:
            return compressed.reshape(-1, dim)
        return compressed.reshape(*output.shape[:-2], self.kept, dim)

    def _text_embeddings(self, images: int) -> list[torch.Tensor]:
        """For each image, the input embeddings of its sample's text tokens."""
        ids = self._input_ids
        is_text = ids != self.boundary.placeholder_id if self.boundary.placeholder_id is not None else torch.ones_like(ids, dtype=torch.bool)
        per_sample = images // ids.shape[0]
        with torch.no_grad():
            embedded = self._embedding(ids)
        return [embedded[i // per_sample][is_text[i // per_sample]] for i in range(images)]


class KeyValueCompressor(_Runtime):
    """Runtime for ``cross_attention`` merges: the visual tokens reach the decoder as keys and values.

    The projector's output is recorded (not changed); where it enters the module that holds the
    decoder blocks, as an argument ``[..., N, D]``, it is replaced by ``[..., k, D]`` (the kept tokens
    of each row of N, e.g. each image tile), and every other argument aligned with the keys (a mask
    whose last dimension is the per-sample key length, like Mllama's expanded cross-attention mask)
    keeps the same positions. The decoder's own sequence is unchanged.
    """

    def __init__(self, model: nn.Module, boundary, config: CompressVisualTokensConfig, blocks: list[str]):
        self.config, self.boundary = config, boundary
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
        indices = selection(rows, self.config, None, self.kept, seeded_generator(self.config.seed, *self.clock.tick()))
        new = dict(kwargs)
        new[name] = _select(rows, indices).reshape(*states.shape[:-2], self.kept, states.shape[-1])
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


def _pack(value: torch.Tensor, keep: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Keep the marked positions of each row; rows of unequal length are right-padded.

    Padding is 0, or ignore-index (-100) for label-like inputs (those holding -100 anywhere).
    """
    if bool((lengths == lengths[0]).all()):
        return value[keep].reshape(value.shape[0], int(lengths[0]))
    pad = IGNORE_INDEX if bool((value == IGNORE_INDEX).any()) else 0
    out = value.new_full((value.shape[0], int(lengths.max())), pad)
    for row in range(value.shape[0]):
        out[row, : int(lengths[row])] = value[row][keep[row]]
    return out


def estimate(structure, config: CompressVisualTokensConfig) -> Savings:
    """Decoder positions removed per sample: ``images per sample * (N - k)``, at the example's images."""
    b = structure.boundary
    if b is None or b.kind == "cross_attention" or b.tokens_per_image is None or not b.images \
            or (config.method == "pool" and b.grid is None):
        return Savings()  # cross-attention: the keys shrink, the decoder sequence does not
    removed = b.images * (b.tokens_per_image - kept_count(b.tokens_per_image, config, b.grid))
    return Savings(tokens_removed=removed / structure.batch if structure.batch else removed)


@register_pass("compress_visual_tokens", CompressVisualTokensConfig, estimate)
def apply(model: nn.Module, structure, config: CompressVisualTokensConfig, example_inputs: dict):
    """Install the compressor at ``structure.boundary``; return the runtime and what was done."""
    b = structure.boundary
    if b is None:
        raise ValueError("compress_visual_tokens needs a vision boundary, and none was found: "
                         + "; ".join(structure.notes))
    if b.kind not in ("scatter", "concat", "cross_attention"):
        raise ValueError(f"compress_visual_tokens supports scatter, concat and cross_attention merges; this model "
                         f"merges by {b.kind} ({b.merge_op})")
    if b.kind == "cross_attention":
        if config.method not in ("uniform", "random"):
            raise ValueError(f"method {config.method!r} is not supported for cross_attention merges; use uniform "
                             f"or random")
        if b.producer_module is None or not b.visual_shape or not structure.blocks:
            raise ValueError("compress_visual_tokens needs the module producing the visual keys and the decoder "
                             "blocks; the matcher could not derive them")
        compressor = KeyValueCompressor(model, b, config, [block.path for block in structure.blocks])
        return compressor, PassInfo("compress_visual_tokens", 1, {
            "boundary": b.kind, "producer_module": b.producer_module, "method": config.method,
            "keys_per_row": compressor.tokens, "kept_per_row": compressor.kept})
    if b.tokens_per_image is None or b.producer_module is None:
        raise ValueError("compress_visual_tokens needs the visual tokens per image and the module producing them; "
                         "the matcher could not derive them")
    if b.kind == "scatter" and b.placeholder_id is None:
        raise ValueError("compress_visual_tokens needs the image placeholder token id of a scatter merge")
    if config.method == "pool" and b.grid is None:
        raise ValueError("method 'pool' needs the 2-D token grid, which the matcher could not derive")
    compressor = VisualTokenCompressor(model, b, config)
    return compressor, PassInfo("compress_visual_tokens", 1, {
        "boundary": b.kind, "producer_module": b.producer_module, "method": config.method,
        "tokens_per_image": b.tokens_per_image, "kept_per_image": compressor.kept,
        "sequence_inputs_shrunk": b.aligned_inputs if b.kind == "scatter" else [],
    })
