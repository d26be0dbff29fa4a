"""Layout: where each image's visual tokens sit in the sequence that enters the decoder.

The matcher finds *which* positions of the merged sequence are visual (a ``[batch, seq]`` mask);
this module groups them into images, the unit every compression method works on:

* a **run** is a maximal stretch of consecutive visual positions in one row;
* an image is one run (the usual layout: ``[text] <image> x N [text]``), a piece of one where images sit back to
  back with nothing between them (a robot's cameras: each piece as many tokens as the tower gives an image), or, in
  the **rows** layout,
  a chain of equal-length runs each followed by one separator token of the same id (a break token
  after each row of patches, as Pixtral-style models lay images out); the image's grid is then
  (runs, run length) and the separators stay in the sequence as text;
* an image's **grid** (rows, cols), where known, lets ``uniform`` keep an even spread in 2-D;
* **views** of one picture: where the layout says so (a global view plus slices or crops, each view opened by a
  marker token), consecutive images of a row are views of one picture (:func:`pictures_in`). The views stay the
  unit of compression (each on its own grid); the report says which positions belong to one picture.

Everything here is a pure function of tensors; it runs on the example at match time (to report tokens
per image) and on every training batch in the compressor.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod

import torch

__all__ = ["Image", "images_in", "metadata_grids", "metadata_scale", "pictures_in", "runs_in"]


@dataclass(frozen=True)
class Image:
    row: int  # batch row
    positions: tuple[int, ...]  # sequence positions of its visual tokens, in raster order
    grid: tuple[int, int] | None  # (rows, cols) with rows * cols == len(positions), when known

    @property
    def tokens(self) -> int:
        return len(self.positions)


def runs_in(mask: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(row, start, length)`` of every run of True in the rows of a ``[batch, seq]`` bool mask."""
    padded = torch.nn.functional.pad(mask.to(torch.int8), (1, 1))
    edges = padded.diff(dim=1)
    starts, ends = (edges == 1).nonzero().tolist(), (edges == -1).nonzero().tolist()
    return [(row, start, end - start) for (row, start), (_, end) in zip(starts, ends)]


def images_in(mask: torch.Tensor, token_ids: torch.Tensor | None = None, rows_layout: bool = False,
              grids: Sequence[tuple[int, int] | None] = (), default_grid: tuple[int, int] | None = None,
              cut: int | None = None) -> list[Image]:
    """Group the visual positions of ``mask`` into images, in sequence order (row by row).

    ``rows_layout``: chain runs into images as described in the module docstring (needs ``token_ids``
    to compare separators). The grid of an image that is a single run is ``grids[i]`` (per-image
    metadata, in image order), else ``default_grid`` (e.g. a patch convolution's), where its size
    matches the image's. ``cut``: images sit back to back, each of ``cut`` tokens: a run of a multiple of ``cut``
    positions is cut into that many images.
    """
    runs = runs_in(mask)
    if cut:
        runs = [piece for run in runs for piece in _cut(run, cut)]
    groups: list[list[tuple[int, int, int]]] = []
    for run in runs:
        if rows_layout and groups and _continues(groups[-1], run, token_ids):
            groups[-1].append(run)
        else:
            groups.append([run])
    images = []
    for index, group in enumerate(groups):
        row = group[0][0]
        positions = tuple(p for _, start, length in group for p in range(start, start + length))
        if len(group) > 1:
            image_grid = (len(group), group[0][2])
        else:
            candidates = (grids[index] if index < len(grids) else None, default_grid)
            image_grid = next((g for g in candidates if g is not None and prod(g) == len(positions)), None)
        images.append(Image(row, positions, image_grid))
    return images


def _cut(run: tuple[int, int, int], cut: int) -> list[tuple[int, int, int]]:
    """``run`` in pieces of ``cut`` positions, where it holds a whole number of them (else whole)."""
    row, start, length = run
    if length % cut:
        return [run]
    return [(row, start + offset, cut) for offset in range(0, length, cut)]


def _continues(group: list[tuple[int, int, int]], run: tuple[int, int, int], token_ids: torch.Tensor) -> bool:
    """``run`` is the next row of the image ``group``: same batch row and length, one separator token
    between them, and that separator has the id of the group's earlier separators."""
    row, start, length = run
    last_row, last_start, last_length = group[-1]
    if row != last_row or length != last_length or start != last_start + last_length + 1:
        return False
    separator = int(token_ids[row, start - 1])
    if len(group) > 1:
        first_row, first_start, first_length = group[0]
        return separator == int(token_ids[first_row, first_start + first_length])
    return True


def pictures_in(images: list[Image], token_ids: torch.Tensor) -> list[list[Image]]:
    """Group ``images`` (in sequence order) into pictures: an image continues the picture before it in its row when
    both are opened by markers (token ids found in ``token_ids`` only right before an image) and its marker differs
    from the one that opened the picture (a ``<slice>`` after ``<image>``, a high-resolution view after a
    low-resolution one, the next tile's marker); any other image starts a picture of its own."""
    opener = {id(image): int(token_ids[image.row, image.positions[0] - 1]) for image in images if image.positions[0]}
    uses = Counter(opener.values())
    everywhere = Counter(token_ids.flatten().tolist())
    markers = {token for token, count in uses.items() if everywhere[token] == count}
    pictures: list[list[Image]] = []
    for image in images:
        first = pictures[-1][0] if pictures else None
        if first is not None and first.row == image.row and opener.get(id(first)) in markers \
                and opener.get(id(image)) in markers and opener[id(image)] != opener[id(first)]:
            pictures[-1].append(image)
        else:
            pictures.append([image])
    return pictures


def metadata_grids(values: torch.Tensor, scale: int) -> list[tuple[int, int]]:
    """Per-image grids from metadata rows ``[..., height, width]`` (patches or pixels) divided by ``scale``."""
    return [(int(h) // scale, int(w) // scale) for h, w in values[:, -2:].tolist()]


def metadata_scale(values: torch.Tensor, tokens: list[int]) -> int | None:
    """The ``scale`` for which every row of ``values`` ``[images, >= 2]`` gives its image's token count as
    ``(height / scale) * (width / scale)`` (e.g. a grid in patches merged 2 x 2, or an image size in pixels
    with 16-pixel tokens); None when there is no such scale."""
    if values.dim() != 2 or values.shape[1] < 2 or values.shape[0] != len(tokens) or values.is_floating_point():
        return None
    scales = set()
    for (h, w), n in zip(values[:, -2:].tolist(), tokens):
        scale = round((h * w / n) ** 0.5) if n and h * w % n == 0 else 0
        if scale < 1 or h % scale or w % scale or (h // scale) * (w // scale) != n:
            return None
        scales.add(scale)
    return scales.pop() if len(scales) == 1 else None
