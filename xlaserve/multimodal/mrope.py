"""M-RoPE positions (Qwen2.5-VL), device-free: rows (temporal, height, width) per token.

Text tokens have three equal rows; an image's placeholders get the text position where it
starts plus their (frame, row, column) in the merged patch grid; the text after an image
continues from the image's largest position + 1 (transformers' `get_rope_index`). Generated
tokens continue the same way: the prompt's shift (the "rope delta") applies past its end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from xlaserve.multimodal.inputs import ImageItem


def mrope_positions(items: Sequence[ImageItem], start: int, n: int) -> np.ndarray:
    """i32[3, n] the positions of tokens start .. start + n of a sequence with `items`."""
    pos = np.arange(start, start + n, dtype=np.int64)
    out = np.broadcast_to(pos, (3, n)).copy()
    shift = 0  # text position - token index, after the images so far
    for it in sorted(items, key=lambda it: it.start):
        t, h, w = it.grid
        base = it.start + shift  # the text position the image starts at
        lo, hi = max(start, it.start), min(start + n, it.end)
        if lo < hi:
            idx = np.arange(lo, hi) - it.start
            out[:, lo - start : hi - start] = base + np.stack(
                [idx // (h * w), (idx // w) % h, idx % w]
            )
        shift = base + max(h, w) - it.end
        after = pos >= it.end
        out[:, after] = pos[after] + shift
    return out.astype(np.int32)


def step_mrope_positions(
    chunks: Sequence, num_tokens: int, items_of: Callable[[int], Sequence[ImageItem]]
) -> np.ndarray:
    """i32[3, num_tokens] for a step's chunks (seq_id, start_pos, token_ids; batch order),
    zeros in the padding."""
    out = np.zeros((3, num_tokens), np.int32)
    offset = 0
    for c in chunks:
        n = len(c.token_ids)
        out[:, offset : offset + n] = mrope_positions(items_of(c.seq_id), c.start_pos, n)
        offset += n
    return out
