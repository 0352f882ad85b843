"""What the draft-model and EAGLE loops share: one token per row, decoded in place.

Rows [0, num_seqs) each feed one token at their own position; its K/V goes to the slot the
row's page table gives, unless the position is past the row's allocated pages (`limits`), where
nothing is written. Padding rows write nothing and attend to nothing.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from xlaserve.engine.runner_api import RunnerConfig
from xlaserve.models.attention import AttentionMetadata


def empty_rows(config: RunnerConfig) -> tuple[np.ndarray, ...]:
    """(tokens or rows [R], positions [R], page tables [R, P], limits [R], num_seqs [1])."""
    rows = config.max_num_seqs
    return (np.zeros(rows, np.int32), np.zeros(rows, np.int32),
            np.zeros((rows, config.pages_per_seq), np.int32), np.zeros(rows, np.int32),
            np.zeros(1, np.int32))  # fmt: skip


def one_token_metadata(positions, pages, limits, num_seqs, page_size: int) -> AttentionMetadata:
    """Attention metadata for one token per row at `positions` (inside a jitted loop)."""
    rows = positions.shape[0]
    live = jnp.arange(rows) < num_seqs[0]
    page = jnp.take_along_axis(pages, jnp.minimum(positions // page_size, pages.shape[1] - 1)
                               [:, None], 1)[:, 0]  # fmt: skip
    slot = jnp.where(live & (positions < limits), page * page_size + positions % page_size, -1)
    return AttentionMetadata(
        slot_mapping=slot,
        cu_q_lens=jnp.minimum(jnp.arange(rows + 1, dtype=jnp.int32), num_seqs[0]),
        kv_lens=jnp.where(live, positions + 1, 0),
        page_indices=pages,
        num_seqs=num_seqs,
    )
