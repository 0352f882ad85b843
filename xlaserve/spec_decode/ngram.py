"""Prompt-lookup (n-gram) drafts, for a whole batch at once in numpy.

For each sequence the longest suffix of its tokens (between `min_n` and `max_n` long) that also
occurs earlier is looked up; the tokens that followed its most recent earlier occurrence are the
drafts. A continuation that runs into the suffix itself repeats with the match's period, so a
periodic text drafts a full `k` tokens. All sequences are matched together on one padded matrix
(one comparison per n), with no per-token Python loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# Only the most recent tokens are searched: bounds the matrix (and the cost) for long contexts.
SEARCH_WINDOW = 4096


def propose_ngram(
    contexts: Sequence[Sequence[int]], k: int, min_n: int, max_n: int, *,
    limits: Sequence[int] | None = None,
) -> list[list[int]]:  # fmt: skip
    """Drafts (up to k tokens, [] when nothing matches) for each context. `limits` caps each
    sequence's draft count (e.g. by its remaining max_tokens)."""
    num = len(contexts)
    drafts: list[list[int]] = [[] for _ in range(num)]
    if num == 0:
        return drafts
    lengths = np.array([min(len(c), SEARCH_WINDOW) for c in contexts], np.int64)
    width = int(lengths.max())
    if width <= min_n:
        return drafts
    tokens = np.full((num, width), -1, np.int64)  # right-aligned; -1 never matches a token
    for i, c in enumerate(contexts):
        if lengths[i]:
            tokens[i, width - lengths[i] :] = c[-lengths[i] :]
    found = np.zeros(num, np.bool_)
    start = np.zeros(num, np.int64)  # where the continuation begins (padded coordinates)
    for n in range(min(max_n, width - 1), min_n - 1, -1):
        todo = ~found & (lengths > n)
        if not todo.any():
            continue
        rows = np.flatnonzero(todo)
        suffix = tokens[rows, width - n :]  # [B, n]
        windows = sliding_window_view(tokens[rows], n, axis=1)[:, : width - n]  # [B, W - n, n]
        hits = (windows == suffix[:, None, :]).all(axis=-1)  # [B, W - n]
        has = hits.any(axis=1)
        last = width - n - 1 - np.argmax(hits[:, ::-1], axis=1)  # most recent occurrence
        rows, last = rows[has], last[has]
        found[rows] = True
        start[rows] = last + n
    if not found.any():
        return drafts
    rows = np.flatnonzero(found)
    period = width - start[rows]  # >= 1: the continuation starts before the end
    offsets = start[rows, None] + np.arange(k)[None, :] % period[:, None]
    picked = np.take_along_axis(tokens[rows], offsets, axis=1)
    for r, row in zip(rows.tolist(), picked.tolist(), strict=True):
        cap = k if limits is None else max(0, min(k, int(limits[r])))
        drafts[r] = row[:cap]
    return drafts
