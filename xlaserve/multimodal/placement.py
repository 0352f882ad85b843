"""Which rows of a step's token batch take which image feature rows (device-free).

A prefill chunk may start or end inside an image's placeholders (chunked prefill, a prefix
hit): only the placeholders inside the chunk are placed, each with its own feature row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from xlaserve.multimodal.inputs import ImageItem


@dataclass(frozen=True)
class ImagePlacement:
    item: ImageItem
    step_rows: np.ndarray  # i32[n] rows of the step's token batch
    feature_rows: np.ndarray  # i32[n] rows of the image's encoder output


def image_placements(
    chunks: Sequence, items_of: Callable[[int], Sequence[ImageItem]]
) -> list[ImagePlacement]:
    """Placements for `chunks` (objects with seq_id, start_pos and token_ids, in batch order);
    `items_of(seq_id)` gives a sequence's images."""
    placements, offset = [], 0
    for c in chunks:
        start, n = c.start_pos, len(c.token_ids)
        for item in items_of(c.seq_id):
            if item.end <= start or item.start >= start + n:
                continue
            lo, hi = np.searchsorted(item.positions, [start, start + n])
            if hi > lo:
                rows = item.positions[lo:hi] - start + offset
                placements.append(ImagePlacement(item, rows.astype(np.int32),
                                                 np.arange(lo, hi, dtype=np.int32)))  # fmt: skip
        offset += n
    return placements


def new_encoder_features(items: Sequence[ImageItem], start: int, end: int) -> int:
    """Feature rows of the images whose first placeholder lies in [start, end): the encoder
    work a chunk over those positions starts (what the scheduler's encoder budget counts)."""
    return sum(it.num_features for it in items if start <= it.start < end)


def cut_before_image(
    items: Sequence[ImageItem], start: int, end: int, budget: int, *, may_exceed: bool
) -> int:
    """The end of a chunk [start, end) shortened so that the images it starts need at most
    `budget` encoder feature rows. With `may_exceed` (nothing was encoded yet this step) an
    image larger than the whole budget may start at the chunk's first position, so progress
    is never blocked. Returns the new end (start: nothing fits)."""
    used = 0
    for it in sorted(items, key=lambda it: it.start):
        if not start <= it.start < end:
            continue
        if used + it.num_features > budget and (used or it.start > start or not may_exceed):
            return it.start
        used += it.num_features
    return end
