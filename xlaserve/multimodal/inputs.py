"""One image of a prompt as plain data (device-free): its content hash, where its placeholder
tokens sit in the prompt, and the processor's tiles the encoder reads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class ImageItem:
    """An image after the model's processor.

    `positions` are the prompt positions of its placeholder tokens, in order: the encoder's
    feature row j replaces the token at positions[j]. `key` is a SHA-256 of the processed
    tiles (and the model's processor settings), so equal keys mean equal features.
    """

    key: bytes
    positions: np.ndarray  # i32[F] prompt positions of the placeholder tokens
    pixels: np.ndarray  # f32[B, ch, S, S] the processor's tiles (Qwen2.5-VL: f32[P, patch])
    num_tiles: int
    # Qwen2.5-VL: (frames, rows, columns) of the merged patch grid, one placeholder each
    # (M-RoPE positions; the encoder's patch grid is this times the merge size).
    grid: tuple[int, int, int] | None = None

    @property
    def num_features(self) -> int:
        return len(self.positions)

    @property
    def start(self) -> int:
        return int(self.positions[0])

    @property
    def end(self) -> int:
        """One past its last placeholder position."""
        return int(self.positions[-1]) + 1


def items_in_range(items: Sequence[ImageItem], start: int, end: int) -> list[ImageItem]:
    """The images with a placeholder token in [start, end)."""
    return [it for it in items if it.start < end and start < it.end and _any_in(it, start, end)]


def _any_in(item: ImageItem, start: int, end: int) -> bool:
    lo = np.searchsorted(item.positions, start)
    return lo < len(item.positions) and item.positions[lo] < end


def page_extra_key(items: Sequence[ImageItem], start: int, end: int) -> bytes:
    """What a prefix-cache page [start, end) adds to its hash: the keys of the images whose
    placeholders it holds (b"" for a text-only page)."""
    return b"".join(it.key for it in items_in_range(items, start, end))
