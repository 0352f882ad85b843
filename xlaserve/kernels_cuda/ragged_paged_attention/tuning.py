"""Block sizes of the Triton ragged paged attention kernel, kept as data.

Provenance: no GPU was available when these were written; they are first settings chosen for
correctness (tl.dot needs every dimension >= 16 on tensor cores), not measured optima. Replace
an entry only with numbers from a run written to `benchmarks/results/`.
- block_rows: query rows per program = query tokens x G_PAD heads of one kv head. 16 keeps
  decode (one token per sequence) from wasting most of the tile.
- block_kv: key positions per inner step.
"""

import dataclasses

import triton


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    block_rows: int = 16
    block_kv: int = 32
    num_warps: int = 4


# head_dim -> sizes (nearest smaller entry is used; larger heads keep tiles in registers).
TABLE: dict[int, BlockSizes] = {
    64: BlockSizes(block_rows=16, block_kv=32, num_warps=4),
    128: BlockSizes(block_rows=16, block_kv=32, num_warps=4),
    256: BlockSizes(block_rows=16, block_kv=16, num_warps=8),
}


def block_sizes_for(head_dim: int, group: int, **overrides: int | None) -> BlockSizes:
    """Sizes for a head dim and group G = N // K; `overrides` that are not None win.

    block_rows is raised to at least G rounded up to a power of two (one whole head group per
    query token); both block sizes must be powers of two >= 16.
    """
    fitting = [h for h in TABLE if h <= head_dim]
    sizes = TABLE[max(fitting)] if fitting else BlockSizes()
    sizes = dataclasses.replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    for name in ("block_rows", "block_kv"):
        value = getattr(sizes, name)
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    group_pad = triton.next_power_of_2(group)
    return dataclasses.replace(sizes, block_rows=max(sizes.block_rows, group_pad))
