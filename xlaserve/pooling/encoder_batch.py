"""The dense [S, L] batches an encoder step runs as: a step's sequences grouped by length
bucket L (powers of two up to max_model_len), each group padded to a sequence bucket S.

Within a group every sequence is longer than half its bucket, so padding adds under 2x to the
tokens, and attention costs S * L^2 per group instead of T^2 over the whole packed step. The
token budget bounds a group's rows (at most budget // (L / 2 + 1) sequences fit in a step),
which bounds the shapes: every (S, L) a step can need is compiled at warm-up. Host only
(numpy); the runner hands each group to its jitted graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xlaserve.engine.input_batch import bucket_for
from xlaserve.engine.runner_api import power_of_two_buckets


@dataclass(frozen=True)
class EncoderGroup:
    """One graph call: rows [S, L] holding the step's sequences `indices` (in step order)."""

    indices: list[int]
    input_ids: np.ndarray  # i32[S, L], 0-padded
    token_type_ids: np.ndarray  # i32[S, L]
    lengths: np.ndarray  # i32[S], 0 for padding rows
    methods: np.ndarray  # i32[S] pooling method per row


def row_buckets(most: int) -> tuple[int, ...]:
    """1, 4, 16, ... capped by `most` (always included): few shapes to compile; a full step,
    the case that matters for throughput, always runs its largest bucket."""
    rows, r = [], 1
    while r < most:
        rows.append(r)
        r *= 4
    return (*rows, most)


def split_rows(indices: list[int], buckets: tuple[int, ...]) -> list[tuple[list[int], int]]:
    """`indices` as (part, row bucket) calls: a part fills at least 3/4 of its bucket (or is
    the smallest bucket), else the largest bucket that fits is split off and the rest follows;
    so padding wastes at most a quarter of a call's rows."""
    calls, rest = [], list(indices)
    while rest:
        bucket = bucket_for(min(len(rest), buckets[-1]), buckets)
        if len(rest) >= bucket or 4 * len(rest) >= 3 * bucket or bucket == buckets[0]:
            take = min(len(rest), bucket)
        else:
            take = bucket = max(b for b in buckets if b <= len(rest))
        calls.append((rest[:take], bucket))
        rest = rest[take:]
    return calls


class EncoderBuckets:
    def __init__(self, *, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 min_length: int = 16) -> None:  # fmt: skip
        self.lengths = power_of_two_buckets(min_length, max_model_len)
        self.rows: dict[int, tuple[int, ...]] = {}  # L -> its sequence buckets
        shorter = 0  # the bucket below: sequences in bucket L are longer than it
        for length in self.lengths:
            most = max(1, min(max_num_seqs, max_num_batched_tokens // (shorter + 1)))
            self.rows[length] = row_buckets(most)
            shorter = length

    def shapes(self) -> list[tuple[int, int]]:
        """Every (S, L) a step can run, for warm-up."""
        return [(s, length) for length in self.lengths for s in self.rows[length]]

    def groups(self, token_ids: list[list[int]], pair_starts: list[int | None],
               methods: list[int]) -> list[EncoderGroup]:  # fmt: skip
        """The step's sequences (whole prompts, in step order) as padded groups."""
        by_length: dict[int, list[int]] = {}
        for i, ids in enumerate(token_ids):
            by_length.setdefault(bucket_for(len(ids), self.lengths), []).append(i)
        groups = []
        for length, indices in by_length.items():
            for part, rows in split_rows(indices, self.rows[length]):
                ids = np.zeros((rows, length), np.int32)
                types = np.zeros((rows, length), np.int32)
                lens = np.zeros(rows, np.int32)
                row_methods = np.zeros(rows, np.int32)
                for r, i in enumerate(part):
                    n = len(token_ids[i])
                    ids[r, :n] = token_ids[i]
                    if pair_starts[i] is not None:
                        types[r, pair_starts[i] : n] = 1
                    lens[r], row_methods[r] = n, methods[i]
                groups.append(EncoderGroup(part, ids, types, lens, row_methods))
        return groups
