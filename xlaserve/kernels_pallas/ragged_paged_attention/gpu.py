"""Ragged paged attention as a Pallas GPU kernel (Triton lowering).

Same contract as `reference.py` (read its docstring first). Layout of the computation:

- A program owns one query tile of one sequence for one kv head: `block_rows` rows, each row
  one (token, query head of that kv head) pair, token-major, so a tile holds
  `block_rows // G` tokens. The G query heads sharing a kv head read its keys once, and
  decode (one token per sequence) still fills a >= 16-row tensor-core tile when G is small.
  Tiles are scheduled per sequence (outside the kernel, in jnp): `cdiv(q_len, tokens per
  tile)` tiles each; programs past the last tile exit at once.
- Grid (query tiles, K, kv splits). With kv_splits > 1 (flash-decoding) the keys a tile can
  see are cut into kv_splits contiguous ranges; each program writes a normalised partial
  output with its running max and sum, and a small jnp step merges them.
- Keys are gathered token by token through the page table (`block_kv` keys per step, any
  number of pages), with masked loads: nothing at or past `kv_lens` is read, so unused pages
  never reach the softmax. Only keys up to the tile's causal frontier are visited, and with a
  sliding window only from the window start of the tile's first row.
- Online softmax in float32; the result of rows with no keys (padding) is zero. The output
  buffer is zero-filled and aliased, so rows no program owns stay zero.
- An int8 / float8 cache (xlaserve/quantization/kv_cache.py; rows of H values and two scale
  elements) is read as it lies: the H values and the two scale elements of each key row are
  loaded (about half the bytes of bfloat16), dequantized in registers and meet q in q's dtype.

Axis letters (docs/glossary.md): T tokens, S sequences, N query heads, K kv heads,
G = N // K, H head dim, P pages; M = block_rows, Lb = block_kv.

`interpret=True` runs it on CPU through Pallas' HLO interpreter.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from xlaserve.kernels_pallas.ragged_paged_attention import tuning
from xlaserve.kernels_pallas.ragged_paged_attention.reference import validate_inputs
from xlaserve.quantization.kv_cache import is_quantized_kv, scale_from_bytes

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)


def _attention_kernel(
    tile_seq_ref,  # i32[NT] sequence of each tile (>= num_seqs: idle)
    tile_row_ref,  # i32[NT] first token row of each tile
    kv_lens_ref,  # i32[S]
    page_indices_ref,  # i32[S, pages_per_seq]
    cu_q_lens_ref,  # i32[S + 1]
    num_seqs_ref,  # i32[1]
    q_ref,  # [T, N, H]
    kv_ref,  # [P, page_size, 2K, H] (or [P, page_size, 2K, H + 2] 8-bit with row scales)
    init_ref,  # aliased with the first output (zeros); unused
    *out_refs,  # splits == 1: o [T, N, H]; else o f32[splits, T, N, H], m, l f32[splits, T, N]
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    group: int,
    block_rows: int,
    block_kv: int,
    kv_splits: int,
    quantized: bool,
):
    del init_ref
    tile, kv_head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    head_dim = q_ref.shape[-1]
    page_size = kv_ref.shape[1]
    seq = tile_seq_ref[tile]
    tokens_per_tile = block_rows // group
    # float32 inputs: exact (IEEE) products, not TF32, to match the reference.
    tf32 = False if q_ref.dtype == jnp.float32 else None

    @pl.when(seq < num_seqs_ref[0])
    def _():
        row0 = tile_row_ref[tile]
        q_start, q_end = cu_q_lens_ref[seq], cu_q_lens_ref[seq + 1]
        kv_len = kv_lens_ref[seq]
        context = kv_len - (q_end - q_start)  # position of the sequence's first query row
        r = jnp.arange(block_rows, dtype=jnp.int32)
        tok = row0 + lax.div(r, group)  # [M]
        row_ok = (r < tokens_per_tile * group) & (tok < q_end)
        # Masked rows point past the last token: never touched on a GPU, and dropped by the
        # interpreter's scatter (a clamped index could collide with a real row).
        tok = jnp.where(row_ok, tok, q_ref.shape[0])
        head = jnp.where(row_ok, kv_head * group + lax.rem(r, group), 0)
        lanes = jnp.arange(head_dim, dtype=jnp.int32)[None, :]  # [1, H]
        # Gathers index every axis with arrays (broadcast to [M, H]): Triton pointer math.
        q_at = (tok[:, None], head[:, None], lanes)
        q = plgpu.load(q_ref.at[q_at], mask=row_ok[:, None], other=0.0)  # [M, H]
        q_pos = context + tok - q_start  # [M]

        # Keys [lo, hi) that some row of the tile can see, cut into kv_splits ranges.
        last_tok = jnp.minimum(row0 + tokens_per_tile, q_end) - 1
        hi = context + last_tok - q_start + 1
        lo = jnp.int32(0)
        if sliding_window is not None:
            lo = jnp.maximum(context + row0 - q_start - sliding_window + 1, 0)
        num_blocks = lax.div(hi - lo + block_kv - 1, block_kv)
        per_split = lax.div(num_blocks + kv_splits - 1, kv_splits)
        first_block = split * per_split
        last_block = jnp.minimum(first_block + per_split, num_blocks)

        def kv_step(b, carry):
            acc, m, l = carry  # [M, H], [M], [M]
            pos = lo + b * block_kv + jnp.arange(block_kv, dtype=jnp.int32)  # [Lb]
            key_ok = pos < hi
            pos = jnp.where(key_ok, pos, 0)
            page = plgpu.load(
                page_indices_ref.at[seq, lax.div(pos, page_size)], mask=key_ok, other=0
            )  # [Lb]
            slot = lax.rem(pos, page_size)

            def head_rows(kv_index):  # K (0) or V (1) of the block's keys: [Lb, H]
                at = (page[:, None], slot[:, None], 2 * kv_head + kv_index, lanes)
                if not quantized:
                    return plgpu.load(kv_ref.at[at], mask=key_ok[:, None], other=0.0)
                # Masked 8-bit loads take no fill value (Triton casts none to float8): the
                # keys past the frontier are zeroed after dequantizing instead.
                scale_at = (page, slot, 2 * kv_head + kv_index)
                scale = scale_from_bytes(
                    plgpu.load(kv_ref.at[(*scale_at, head_dim)], mask=key_ok),
                    plgpu.load(kv_ref.at[(*scale_at, head_dim + 1)], mask=key_ok),
                )  # [Lb]
                values = plgpu.load(kv_ref.at[at], mask=key_ok[:, None]).astype(jnp.float32)
                values = jnp.where(key_ok[:, None], values * scale[:, None], 0.0)
                return values.astype(q.dtype)

            k, v = head_rows(0), head_rows(1)
            scores = plgpu.dot(q, k, trans_b=True, allow_tf32=tf32) * sm_scale  # [M, Lb]
            if soft_cap is not None:
                scores = soft_cap * jnp.tanh(scores / soft_cap)
            mask = row_ok[:, None] & key_ok[None, :] & (pos[None, :] <= q_pos[:, None])
            if sliding_window is not None:
                mask &= pos[None, :] > q_pos[:, None] - sliding_window
            scores = jnp.where(mask, scores, MASK_VALUE)
            m_next = jnp.maximum(m, jnp.max(scores, axis=1))
            probs = jnp.where(mask, jnp.exp(scores - m_next[:, None]), 0.0)
            alpha = jnp.exp(m - m_next)
            l_next = alpha * l + jnp.sum(probs, axis=1)
            pv = plgpu.dot(probs.astype(v.dtype), v, allow_tf32=tf32)  # [M, H]
            return alpha[:, None] * acc + pv, m_next, l_next

        init = (
            jnp.zeros((block_rows, head_dim), jnp.float32),
            jnp.full((block_rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((block_rows,), jnp.float32),
        )
        acc, m, l = lax.fori_loop(first_block, last_block, kv_step, init)
        out = acc / jnp.where(l > 0, l, 1.0)[:, None]
        if kv_splits == 1:
            (o_ref,) = out_refs
            plgpu.store(o_ref.at[q_at], out.astype(o_ref.dtype), mask=row_ok[:, None])
        else:
            o_ref, m_ref, l_ref = out_refs
            plgpu.store(o_ref.at[(split, *q_at)], out, mask=row_ok[:, None])
            plgpu.store(m_ref.at[split, tok, head], m, mask=row_ok)
            plgpu.store(l_ref.at[split, tok, head], l, mask=row_ok)


def validate_kernel_args(q, kv_cache, sliding_window, soft_cap, group, block_rows, block_kv):
    head_dim = q.shape[-1]
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q dtype must be float32 or bfloat16, got {q.dtype}")
    if kv_cache.dtype != q.dtype and not is_quantized_kv(kv_cache.dtype):
        raise ValueError(f"kv_cache dtype {kv_cache.dtype} must equal q dtype {q.dtype} "
                         "(or be an int8 / float8 cache)")  # fmt: skip
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head dim must be a power of two >= 16 on GPU, got q {q.shape}")
    for name, size in (("block_rows", block_rows), ("block_kv", block_kv)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {size}")
    if block_rows < group:
        raise ValueError(f"block_rows={block_rows} must hold all G={group} heads of a kv head")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if soft_cap is not None and soft_cap <= 0:
        raise ValueError(f"soft_cap must be > 0, got {soft_cap}")


def tile_schedule(cu_q_lens, num_seqs, tokens_per_tile: int, num_tiles: int):
    """(sequence, first token row) of each query tile; idle tiles get sequence num_seqs."""
    max_num_seqs = cu_q_lens.shape[0] - 1
    real = jnp.arange(max_num_seqs) < num_seqs[0]
    q_lens = jnp.where(real, cu_q_lens[1:] - cu_q_lens[:-1], 0)  # [S]
    tiles = (q_lens + tokens_per_tile - 1) // tokens_per_tile
    tile_ends = jnp.cumsum(tiles)  # [S]
    ids = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.searchsorted(tile_ends, ids, side="right").astype(jnp.int32)
    seq = jnp.where(seq < num_seqs[0], seq, num_seqs[0])
    safe = jnp.minimum(seq, max_num_seqs - 1)
    first_tile = tile_ends[safe] - tiles[safe]
    row = cu_q_lens[safe] + (ids - first_tile) * tokens_per_tile
    return seq, row.astype(jnp.int32)


def merge_splits(o: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Merges normalised partial outputs o [splits, T, N, H] by their max m and sum l."""
    live = l > 0  # [splits, T, N]
    m = jnp.where(live, m, MASK_VALUE)
    weight = jnp.where(live, jnp.exp(m - jnp.max(m, axis=0)) * l, 0.0)
    total = jnp.sum(weight, axis=0)  # [T, N]
    merged = jnp.sum(jnp.where(live[..., None], o, 0.0) * weight[..., None], axis=0)
    return merged / jnp.where(total > 0, total, 1.0)[..., None]


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "sliding_window",
        "soft_cap",
        "block_rows",
        "block_kv",
        "kv_splits",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)
def ragged_paged_attention(
    q: jax.Array,
    kv_cache: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float = 1.0,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    block_rows: int | None = None,
    block_kv: int | None = None,
    kv_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Ragged paged attention on an NVIDIA GPU; arguments and result as in `reference.py`.

    block_rows: query rows (tokens x G heads) per program, a power of two >= max(16, G);
    block_kv: keys per inner step, a power of two >= 16; kv_splits: programs sharing one
    tile's keys. Unset sizes come from `tuning.py`. interpret=True runs on CPU.
    """
    validate_inputs(q, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs)
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, kv_heads2, _ = kv_cache.shape
    num_kv_heads = kv_heads2 // 2
    group = num_heads // num_kv_heads
    max_num_seqs, pages_per_seq = page_indices.shape
    tuned = tuning.gpu_block_sizes(
        head_dim=head_dim,
        page_size=page_size,
        dtype=q.dtype,
        group=group,
        num_kv_heads=num_kv_heads,
        num_tokens=num_tokens,
        max_num_seqs=max_num_seqs,
        pages_per_seq=pages_per_seq,
    )
    block_rows = block_rows or tuned.block_rows
    block_kv = block_kv or tuned.block_kv
    kv_splits = kv_splits or tuned.kv_splits
    validate_kernel_args(q, kv_cache, sliding_window, soft_cap, group, block_rows, block_kv)
    if kv_splits < 1:
        raise ValueError(f"kv_splits must be >= 1, got {kv_splits}")
    if num_tokens == 0:
        return jnp.zeros(q.shape, q.dtype)
    tokens_per_tile = block_rows // group
    # Each sequence's tiles: sum(cdiv(q_len, tpt)) <= cdiv(T, tpt) + S, and <= T.
    num_tiles = max(1, min(num_tokens, -(-num_tokens // tokens_per_tile) + max_num_seqs))
    tile_seq, tile_row = tile_schedule(cu_q_lens, num_seqs, tokens_per_tile, num_tiles)

    if kv_splits == 1:
        init = jnp.zeros(q.shape, q.dtype)
        out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    else:
        # Only l must start at zero: merge_splits ignores o and m where l == 0.
        init = jnp.zeros((kv_splits, num_tokens, num_heads), jnp.float32)
        out_shape = [
            jax.ShapeDtypeStruct((kv_splits, *q.shape), jnp.float32),
            jax.ShapeDtypeStruct((kv_splits, num_tokens, num_heads), jnp.float32),
            jax.ShapeDtypeStruct((kv_splits, num_tokens, num_heads), jnp.float32),
        ]
    kernel = functools.partial(
        _attention_kernel,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        group=group,
        block_rows=block_rows,
        block_kv=block_kv,
        kv_splits=kv_splits,
        quantized=is_quantized_kv(kv_cache.dtype),
    )
    outs = pl.pallas_call(
        kernel,
        grid=(num_tiles, num_kv_heads, kv_splits),
        out_shape=out_shape,
        input_output_aliases={8: len(out_shape) - 1},
        compiler_params=plgpu.CompilerParams(
            num_warps=num_warps or tuned.num_warps, num_stages=num_stages or tuned.num_stages
        ),
        interpret=interpret,
        name="xlaserve_ragged_paged_attention",
    )(tile_seq, tile_row, kv_lens, page_indices, cu_q_lens, num_seqs, q, kv_cache, init)
    if kv_splits == 1:
        return outs[0]
    return merge_splits(*outs).astype(q.dtype)
