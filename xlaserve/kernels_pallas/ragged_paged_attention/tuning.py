"""Block sizes for the ragged paged attention kernels, kept as data and chosen by shape.

The tables are keyed by (head_dim H, page_size, dtype name, group G = N // K). A lookup takes
the exact key when there is one, otherwise the nearest entry (same dtype, then nearest head dim,
page size and group), and then fits the result to the call's static shape (token count, pages
per sequence, VMEM budget). The kernels take block sizes as arguments and never look here.

Provenance: no TPU or GPU was available when these were written, so the entries are first
settings worked out from the memory budgets below, not measured optima. `benchmarks/kernels.py`
times them; replace an entry only with numbers from a run written to `benchmarks/results/`.
- TPU: the KV double buffer `2 * block_kv_pages * page_size * 2 * block_kv_heads * H * itemsize`
  stays under TPU_KV_BUFFER_BYTES (a quarter of v5e's 16 MiB default scoped VMEM); about 256
  keys per block amortise the per-block softmax bookkeeping; block_q * G stays near 128 rows
  so decode (one live row group per sequence) does not waste most of the MXU tile.
- GPU: block_rows = query rows (tokens x G heads) per program, a power of two >= 16 for the
  tensor-core dot; block_kv = keys per inner step; kv_splits > 1 splits long contexts across
  programs (flash-decoding) when there are too few (sequence, kv head) programs to fill the
  SMs.
"""

import dataclasses

import jax.numpy as jnp

TPU_KV_BUFFER_BYTES = 4 * 1024 * 1024
GPU_TARGET_PROGRAMS = 264  # two waves on an H100's 132 SMs
GPU_MAX_KV_SPLITS = 16
GPU_MIN_KEYS_PER_SPLIT = 512


@dataclasses.dataclass(frozen=True)
class TpuBlockSizes:
    block_q: int  # query tokens per grid step
    block_kv_pages: int  # pages per KV block (one DMA each, double-buffered)
    block_kv_heads: int | None = None  # kv heads per grid step; None = all


@dataclasses.dataclass(frozen=True)
class GpuBlockSizes:
    block_rows: int  # query rows (tokens x G heads of one kv head) per program
    block_kv: int  # keys per inner-loop step
    kv_splits: int = 1  # programs sharing one sequence's keys (flash-decoding)
    num_warps: int = 4
    num_stages: int = 2


# (H, page_size, dtype, G) -> sizes.
TPU_TABLE: dict[tuple[int, int, str, int], TpuBlockSizes] = {
    (64, 16, "bfloat16", 1): TpuBlockSizes(block_q=128, block_kv_pages=16),
    (64, 16, "bfloat16", 4): TpuBlockSizes(block_q=32, block_kv_pages=16),
    (128, 16, "bfloat16", 1): TpuBlockSizes(block_q=128, block_kv_pages=16),
    (128, 16, "bfloat16", 2): TpuBlockSizes(block_q=64, block_kv_pages=16),
    (128, 16, "bfloat16", 4): TpuBlockSizes(block_q=32, block_kv_pages=16),
    (128, 16, "bfloat16", 8): TpuBlockSizes(block_q=16, block_kv_pages=16),
    (128, 32, "bfloat16", 4): TpuBlockSizes(block_q=32, block_kv_pages=8),
    (128, 64, "bfloat16", 4): TpuBlockSizes(block_q=32, block_kv_pages=4),
    (128, 128, "bfloat16", 4): TpuBlockSizes(block_q=32, block_kv_pages=2),
    (128, 128, "bfloat16", 8): TpuBlockSizes(block_q=16, block_kv_pages=2),
    (256, 16, "bfloat16", 2): TpuBlockSizes(block_q=64, block_kv_pages=8),
    (256, 128, "bfloat16", 2): TpuBlockSizes(block_q=64, block_kv_pages=1),
    (128, 16, "float32", 4): TpuBlockSizes(block_q=32, block_kv_pages=8),
    (128, 128, "float32", 4): TpuBlockSizes(block_q=32, block_kv_pages=1),
}

GPU_TABLE: dict[tuple[int, int, str, int], GpuBlockSizes] = {
    (64, 16, "bfloat16", 1): GpuBlockSizes(block_rows=16, block_kv=64),
    (64, 16, "bfloat16", 4): GpuBlockSizes(block_rows=32, block_kv=64),
    (128, 16, "bfloat16", 1): GpuBlockSizes(block_rows=16, block_kv=64),
    (128, 16, "bfloat16", 4): GpuBlockSizes(block_rows=32, block_kv=64),
    (128, 16, "bfloat16", 8): GpuBlockSizes(block_rows=64, block_kv=64),
    (128, 64, "bfloat16", 4): GpuBlockSizes(block_rows=32, block_kv=64),
    (128, 128, "bfloat16", 4): GpuBlockSizes(block_rows=32, block_kv=128, num_stages=3),
    (256, 16, "bfloat16", 2): GpuBlockSizes(block_rows=32, block_kv=32, num_warps=8),
    (128, 16, "float32", 4): GpuBlockSizes(block_rows=32, block_kv=32),
    (256, 16, "float32", 2): GpuBlockSizes(block_rows=16, block_kv=16, num_warps=8),
}


def _nearest(table: dict, head_dim: int, page_size: int, dtype: str, group: int):
    def distance(key):
        h, ps, dt, g = key
        return (
            dt != dtype,
            abs(h.bit_length() - head_dim.bit_length()),
            abs(ps.bit_length() - page_size.bit_length()),
            abs(g.bit_length() - group.bit_length()),
        )

    return table[min(table, key=distance)]


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


def tpu_block_sizes(
    *,
    head_dim: int,
    page_size: int,
    dtype,
    group: int,
    num_kv_heads: int,
    num_tokens: int,
    pages_per_seq: int,
) -> TpuBlockSizes:
    """Block sizes for the TPU kernel, fitted to this call's static shape."""
    dtype = jnp.dtype(dtype)
    sizes = _nearest(TPU_TABLE, head_dim, page_size, dtype.name, group)
    block_q = min(sizes.block_q, 1 << max(0, num_tokens - 1).bit_length())
    pages = max(1, min(sizes.block_kv_pages, pages_per_seq))
    heads = sizes.block_kv_heads or num_kv_heads
    if num_kv_heads % heads:
        heads = num_kv_heads

    def kv_buffer_bytes(pages, heads):
        return 2 * pages * page_size * 2 * heads * head_dim * dtype.itemsize

    # Shrink pages per block first (keeps DMAs contiguous), then split the kv heads.
    while pages > 1 and kv_buffer_bytes(pages, heads) > TPU_KV_BUFFER_BYTES:
        pages //= 2
    while heads % 2 == 0 and kv_buffer_bytes(pages, heads) > TPU_KV_BUFFER_BYTES:
        heads //= 2
    return TpuBlockSizes(block_q=block_q, block_kv_pages=pages, block_kv_heads=heads)


def gpu_block_sizes(
    *,
    head_dim: int,
    page_size: int,
    dtype,
    group: int,
    num_kv_heads: int,
    num_tokens: int,
    max_num_seqs: int,
    pages_per_seq: int,
) -> GpuBlockSizes:
    """Block sizes for the GPU kernel, fitted to this call's static shape.

    kv_splits is chosen from static shapes only: when even one program per (token tile,
    kv head) could not fill the GPU and the longest possible context holds enough keys.
    """
    dtype = jnp.dtype(dtype)
    sizes = _nearest(GPU_TABLE, head_dim, page_size, dtype.name, group)
    rows = max(16, sizes.block_rows, 1 << max(0, group - 1).bit_length())
    max_context = pages_per_seq * page_size
    block_kv = max(16, min(sizes.block_kv, _pow2_floor(max_context)))
    # Query tiles: about one per sequence for decode, T / tokens-per-tile for long prefills.
    tiles = max(min(max_num_seqs, num_tokens), -(-num_tokens // max(1, rows // group)))
    programs = max(1, tiles * num_kv_heads)
    splits = 1
    while (
        splits < GPU_MAX_KV_SPLITS
        and programs * splits * 2 <= GPU_TARGET_PROGRAMS
        and max_context // (splits * 2) >= GPU_MIN_KEYS_PER_SPLIT
    ):
        splits *= 2
    return dataclasses.replace(sizes, block_rows=rows, block_kv=block_kv, kv_splits=splits)
