"""Custom ops the graph lowering inserts (``torch.library``: a real kernel, a fake kernel for tracing and
``torch.compile``, and autograd), registered when ``stsc`` is imported so a saved program loads.

* ``stsc::compress_plan(hidden, visual, token_ids, step, ...) -> (index, restore)``: what the Visual Token
  Compressor keeps in a batch (:func:`stsc.passes.compress_visual_tokens.plan`): ``index [B, T - removed]``,
  the kept positions, and ``restore [B, T]``, the kept slot each position takes its output from. ``removed``
  (positions dropped per row) is fixed when the graph is built, so every shape downstream is ``T - removed``
  with ``T`` the dynamic sequence length: no data-dependent size enters the graph. ``dense_fraction``: the
  pass's, for the draws to follow the module lowering's (a forward drawn dense runs another graph, without
  these ops); ``image_grids`` / ``grid_scale``: the model input holding each image's ``[.., height, width]``
  and its divisor, where the images' token grids come from one (else ``grid``, one for every image);
  ``padding``: the model input marking padding with 0, where the matcher found one. The graph keeps padding
  (its length is fixed when it is built); a batch whose padding the module lowering would shorten further,
  padded in every row, is refused.
* ``stsc::compact(x, index, batch_dim, dims) -> x`` gathered at ``index`` along ``dims``;
* ``stsc::expand(x, restore) -> x`` gathered back to the full length along dim 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stsc.layout import images_in, metadata_grids
from stsc.passes.compress_visual_tokens import CompressVisualTokensConfig, forward_draws, gather_dims, index_along, plan

__all__ = ["compact", "compress_plan", "expand"]


@torch.library.custom_op("stsc::compress_plan", mutates_args=())
def compress_plan(hidden: Tensor, visual: Tensor, token_ids: Tensor, step: Tensor, method: str, keep_ratio: float,
                  kernel: int, seed: int, grid: list[int], rows_layout: bool, removed: int,
                  dense_fraction: float = 0.0, image_grids: Tensor | None = None, grid_scale: int = 1,
                  padding: Tensor | None = None) -> tuple[Tensor, Tensor]:
    config = CompressVisualTokensConfig(method, keep_ratio, kernel, seed, dense_fraction)
    grids = metadata_grids(image_grids, grid_scale) if image_grids is not None else ()
    images = images_in(visual, token_ids, rows_layout, grids, tuple(grid) if grid else None)
    p = plan(hidden.detach(), visual, images, config, forward_draws(config, *step.tolist())[1])
    dropped = sorted(set((visual.shape[1] - p.lengths).tolist()))
    if dropped != [removed]:
        raise ValueError(f"stsc graph lowering: this graph drops {removed} positions in every row (the example's "
                         f"images), but this batch's rows drop {dropped}; use the module lowering (sparsify) for "
                         f"batches whose images differ")
    if padding is not None:
        shortest = int((p.lengths - (padding == 0).sum(dim=1)).max())  # the module lowering drops padding too
        if shortest < p.length:
            raise ValueError(f"stsc graph lowering: every row of this batch has padding; this graph keeps it "
                             f"({p.length} positions) where the module lowering (sparsify) removes it ({shortest}): "
                             f"use the module lowering for batches padded beyond their longest row")
    return p.index, p.restore


@compress_plan.register_fake
def _(hidden, visual, token_ids, step, method, keep_ratio, kernel, seed, grid, rows_layout, removed,
      dense_fraction=0.0, image_grids=None, grid_scale=1, padding=None):
    batch, length = visual.shape
    return visual.new_empty((batch, length - removed), dtype=torch.long), visual.new_empty((batch, length),
                                                                                           dtype=torch.long)


@torch.library.custom_op("stsc::compact", mutates_args=())
def compact(x: Tensor, index: Tensor, batch_dim: int, dims: list[int]) -> Tensor:
    return gather_dims(x, index, batch_dim, dims).clone()


@compact.register_fake
def _(x, index, batch_dim, dims):
    shape = list(x.shape)
    shape[batch_dim] = index.shape[0]
    for dim in dims:
        shape[dim] = index.shape[1]
    return x.new_empty(shape)


def _compact_setup(ctx, inputs, output):
    x, index, batch_dim, dims = inputs
    ctx.save_for_backward(index)
    ctx.shape, ctx.batch_dim, ctx.dims = x.shape, batch_dim, dims


def _compact_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    shapes = [list(ctx.shape)]
    shapes[0][ctx.batch_dim] = index.shape[0]
    for dim in ctx.dims[:-1]:
        shapes.append(shapes[-1][:dim] + [index.shape[1]] + shapes[-1][dim + 1:])
    for dim, shape in zip(reversed(ctx.dims), reversed(shapes)):
        grad = grad.new_zeros(shape).scatter_add(dim, index_along(grad, index, ctx.batch_dim, dim), grad)
    if ctx.shape[ctx.batch_dim] != index.shape[0]:
        grad = grad.sum(dim=ctx.batch_dim, keepdim=True)
    return grad, None, None, None


torch.library.register_autograd("stsc::compact", _compact_backward, setup_context=_compact_setup)


@torch.library.custom_op("stsc::expand", mutates_args=())
def expand(x: Tensor, restore: Tensor) -> Tensor:
    return gather_dims(x, restore, 0, [1]).clone()


@expand.register_fake
def _(x, restore):
    return x.new_empty((x.shape[0], restore.shape[1], *x.shape[2:]))


def _expand_setup(ctx, inputs, output):
    x, restore = inputs
    ctx.save_for_backward(restore)
    ctx.length = x.shape[1]


def _expand_backward(ctx, grad):
    (restore,) = ctx.saved_tensors
    shape = list(grad.shape)
    shape[1] = ctx.length
    return grad.new_zeros(shape).scatter_add(1, index_along(grad, restore, 0, 1), grad), None


torch.library.register_autograd("stsc::expand", _expand_backward, setup_context=_expand_setup)
