"""Ragged paged attention as a Mosaic TPU Pallas kernel.

Same contract as `reference.py` (read its docstring first). Layout of the computation:

- Grid (kv head blocks, query blocks). A query block is `block_q` consecutive rows of the
  ragged token axis, so it may hold the tail of one sequence, several whole decode sequences
  and the head of another. Grid steps are independent ("parallel" on both axes).
- Inside a step, a loop walks the work items (sequence, kv block) of every sequence that owns
  rows of the block, in order, skipping sequences with no rows here and kv blocks no row can
  see (past the causal frontier of the block's last row, or before the sliding window of its
  first row). The pages of the next item are DMA'd from HBM into the other half of a
  double buffer while the current item is computed, across sequence boundaries too.
- Only pages below `kv_lens` are fetched; buffer slots of pages that were not fetched (and
  keys past `kv_lens` inside a fetched page) are masked, so stale or NaN memory never reaches
  the softmax.
- The scalars (kv_lens, page table, cu_q_lens, num_seqs, first sequence of each query block)
  are scalar-prefetched into SMEM.
- GQA: query heads are grouped by kv head outside the kernel, q: [K, T*G, H], so one kv
  head's G query heads of `block_q` tokens form one [block_q * G, H] matrix against that kv
  head's keys. The cache is viewed as [P, page_size, 2K*H] (a free reshape): a page DMA is
  one contiguous run per token row and K/V of head k are the lane slices 2k*H and (2k+1)*H.
- Online softmax in float32 (running max m, sum l, unnormalised accumulator), normalised once
  at the end; rows with no keys (padding) stay zero.
- An int8 / float8 cache (xlaserve/quantization/kv_cache.py) is fetched as it lies, H + 2
  8-bit elements per head row (about half the DMA bytes of bfloat16); each K/V slice is
  dequantized in VMEM with its row scale and meets q in q's dtype.

Axis letters (docs/glossary.md): T tokens, S sequences, N query heads, K kv heads,
G = N // K, H head dim, P pages; M = block_q * G query rows of one kv head in a block.

Runs on CPU under `jax.experimental.pallas.tpu.force_tpu_interpret_mode()` (or with
`interpret=True` / a `pltpu.InterpretParams`), which simulates HBM, VMEM, SMEM, DMAs and
semaphores.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from xlaserve.kernels_pallas.ragged_paged_attention import tuning
from xlaserve.kernels_pallas.ragged_paged_attention.reference import validate_inputs
from xlaserve.quantization.kv_cache import is_quantized_kv, scale_from_bytes

# Finite "minus infinity": exp(MASK - MASK) stays finite, so fully masked rows need no inf math.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
LANES = 128  # m and l are kept lane-broadcast: Mosaic slices whole vregs
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16)


def _attention_kernel(
    # Scalar prefetch (SMEM).
    kv_lens_ref,  # i32[S]
    page_indices_ref,  # i32[S * pages_per_seq]
    cu_q_lens_ref,  # i32[S + 1]
    num_seqs_ref,  # i32[1]
    first_seq_ref,  # i32[num_q_blocks] sequence owning each block's first row
    # Inputs.
    q_ref,  # [Kb, M, H] (VMEM block)
    kv_hbm_ref,  # [P, page_size, 2K*W] (HBM), W = H (+ SCALE_ELEMENTS for an 8-bit cache)
    # Output.
    o_ref,  # [Kb, M, H] (VMEM block)
    # Scratch.
    kv_buf,  # [2, Lb, 2Kb*W] double buffer, Lb = block_kv_pages * page_size
    sems,  # DMA semaphores [2]
    m_ref,  # f32[Kb, M, LANES] running max
    l_ref,  # f32[Kb, M, LANES] running sum
    acc_ref,  # f32[Kb, M, H] unnormalised output
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    group: int,
    page_size: int,
    pages_per_block: int,
    pages_per_seq: int,
    scale_elements: int,
):
    heads_blk, q_blk = pl.program_id(0), pl.program_id(1)
    kv_heads_blk, rows, head_dim = q_ref.shape
    block_q = rows // group
    block_kv = pages_per_block * page_size
    row_width = head_dim + scale_elements  # one head row of K or V in the cache
    heads_width = 2 * kv_heads_blk * row_width
    max_num_seqs = kv_lens_ref.shape[0]
    row_start = q_blk * block_q
    row_end = row_start + block_q
    num_seqs = jnp.minimum(num_seqs_ref[0], max_num_seqs)
    precision = lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None

    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def seq_bounds(seq):
        seq = jnp.minimum(seq, max_num_seqs - 1)
        q_start, q_end = cu_q_lens_ref[seq], cu_q_lens_ref[seq + 1]
        kv_len = kv_lens_ref[seq]
        context = kv_len - (q_end - q_start)  # position of the sequence's first query row
        return q_start, q_end, kv_len, context

    def seq_live(seq):
        # A real sequence whose rows start before this block ends.
        return (seq < num_seqs) & (cu_q_lens_ref[jnp.minimum(seq, max_num_seqs)] < row_end)

    def kv_block_range(seq):
        """[lo, hi) kv blocks that some row of `seq` inside this query block can see."""
        q_start, q_end, _, context = seq_bounds(seq)
        lo_row = jnp.maximum(q_start, row_start)
        hi_row = jnp.minimum(q_end, row_end)
        last_pos = context + (hi_row - q_start) - 1
        hi = jnp.where(hi_row > lo_row, lax.div(last_pos + block_kv, block_kv), 0)
        if sliding_window is None:
            return jnp.int32(0), hi
        first_pos = context + (lo_row - q_start)
        lo = lax.div(jnp.maximum(first_pos - sliding_window + 1, 0), block_kv)
        return jnp.minimum(lo, hi), hi

    def next_item(seq, blk):
        """First work item at or after (seq, blk); the walk ends at a seq that is not live."""
        lo, hi = kv_block_range(seq)

        def skip(carry):
            seq, blk, hi = carry
            return seq_live(seq) & (blk >= hi)

        def advance(carry):
            seq = carry[0] + 1
            lo, hi = kv_block_range(seq)
            return seq, lo, hi

        seq, blk, _ = lax.while_loop(skip, advance, (seq, jnp.maximum(blk, lo), hi))
        return seq, blk

    def for_each_page(seq, blk, buf, action):
        """Applies `action` to the DMA of every page of the block below kv_len (the others
        are never fetched: their buffer slots keep stale data, masked in `attend`)."""
        _, _, kv_len, _ = seq_bounds(seq)
        used_pages = jnp.minimum(lax.div(kv_len + page_size - 1, page_size), pages_per_seq)
        live_pages = jnp.clip(used_pages - blk * pages_per_block, 0, pages_per_block)
        first = jnp.minimum(seq, max_num_seqs - 1) * pages_per_seq + blk * pages_per_block

        def body(i, carry):
            copy = pltpu.make_async_copy(
                kv_hbm_ref.at[
                    page_indices_ref[first + i], :, pl.ds(heads_blk * heads_width, heads_width)
                ],
                kv_buf.at[buf, pl.ds(i * page_size, page_size), :],
                sems.at[buf],
            )
            action(copy)
            return carry

        lax.fori_loop(0, live_pages, body, 0)

    def start_fetch(seq, blk, buf):
        for_each_page(seq, blk, buf, lambda copy: copy.start())

    def wait_fetch(seq, blk, buf):
        for_each_page(seq, blk, buf, lambda copy: copy.wait())

    def head_rows(buf, i):
        """The i-th head slice (K or V) of the buffer as [Lb, H] in q's dtype."""
        start = i * row_width
        values = kv_buf[buf, :, pl.ds(start, head_dim)]
        if not scale_elements:
            return values
        scale = scale_from_bytes(
            kv_buf[buf, :, pl.ds(start + head_dim, 1)],
            kv_buf[buf, :, pl.ds(start + head_dim + 1, 1)],
        )  # [Lb, 1]
        return (values.astype(jnp.float32) * scale).astype(q_ref.dtype)

    def attend(seq, blk, buf):
        q_start, q_end, kv_len, context = seq_bounds(seq)
        row_tok = row_start + lax.div(lax.broadcasted_iota(jnp.int32, (rows, block_kv), 0), group)
        q_pos = context + row_tok - q_start  # [M, Lb] position of each query row
        key_pos = blk * block_kv + lax.broadcasted_iota(jnp.int32, (rows, block_kv), 1)
        mask = (row_tok >= q_start) & (row_tok < q_end) & (key_pos <= q_pos)
        mask &= key_pos < kv_len
        if sliding_window is not None:
            mask &= key_pos > q_pos - sliding_window
        key_pos_v = blk * block_kv + lax.broadcasted_iota(jnp.int32, (block_kv, head_dim), 0)
        key_live = key_pos_v < kv_len  # [Lb, H]: unfetched / stale slots may hold NaN
        for j in range(kv_heads_blk):
            k = head_rows(buf, 2 * j)  # [Lb, H]
            v = head_rows(buf, 2 * j + 1)  # [Lb, H]
            v = jnp.where(key_live, v, jnp.zeros_like(v))
            q = q_ref[j]  # [M, H]
            scores = lax.dot_general(
                q,
                k,
                (((1,), (1,)), ((), ())),
                precision=precision,
                preferred_element_type=jnp.float32,
            )  # [M, Lb]
            scores = scores * sm_scale
            if soft_cap is not None:
                scores = soft_cap * jnp.tanh(scores / soft_cap)
            scores = jnp.where(mask, scores, MASK_VALUE)
            m_prev = m_ref[j][:, :1]  # [M, 1]
            l_prev = l_ref[j][:, :1]
            m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
            probs = jnp.where(mask, jnp.exp(scores - m_next), 0.0)  # [M, Lb]
            alpha = jnp.exp(m_prev - m_next)  # [M, 1]
            l_next = alpha * l_prev + jnp.sum(probs, axis=1, keepdims=True)
            pv = lax.dot_general(
                probs.astype(v.dtype),
                v,
                (((1,), (0,)), ((), ())),
                precision=precision,
                preferred_element_type=jnp.float32,
            )  # [M, H]
            acc_ref[j] = alpha * acc_ref[j] + pv
            m_ref[j] = jnp.broadcast_to(m_next, (rows, LANES))
            l_ref[j] = jnp.broadcast_to(l_next, (rows, LANES))

    seq, blk = next_item(first_seq_ref[q_blk], 0)
    pl.when(seq_live(seq))(functools.partial(start_fetch, seq, blk, 0))

    def step(carry):
        seq, blk, buf = carry
        next_seq, next_blk = next_item(seq, blk + 1)
        pl.when(seq_live(next_seq))(functools.partial(start_fetch, next_seq, next_blk, 1 - buf))
        wait_fetch(seq, blk, buf)
        attend(seq, blk, buf)
        return next_seq, next_blk, 1 - buf

    lax.while_loop(lambda carry: seq_live(carry[0]), step, (seq, blk, jnp.int32(0)))

    for j in range(kv_heads_blk):
        denom = l_ref[j][:, :1]
        o_ref[j] = (acc_ref[j] / jnp.where(denom > 0, denom, 1.0)).astype(o_ref.dtype)


def validate_kernel_args(
    q: jax.Array,
    kv_cache: jax.Array,
    page_indices: jax.Array,
    sliding_window: int | None,
    soft_cap: float | None,
) -> None:
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q dtype must be float32 or bfloat16, got {q.dtype}")
    if kv_cache.dtype != q.dtype and not is_quantized_kv(kv_cache.dtype):
        raise ValueError(f"kv_cache dtype {kv_cache.dtype} must equal q dtype {q.dtype} "
                         "(or be an int8 / float8 cache)")  # fmt: skip
    if page_indices.shape[1] < 1:
        raise ValueError(f"page_indices needs at least one page per sequence: {page_indices.shape}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if soft_cap is not None and soft_cap <= 0:
        raise ValueError(f"soft_cap must be > 0, got {soft_cap}")


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "sliding_window",
        "soft_cap",
        "block_q",
        "block_kv_pages",
        "block_kv_heads",
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
    block_q: int | None = None,
    block_kv_pages: int | None = None,
    block_kv_heads: int | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """Ragged paged attention on TPU; arguments and result as in `reference.py`.

    block_q: query tokens per grid step; block_kv_pages: pages per KV block (one DMA each);
    block_kv_heads: kv heads per grid step (divides K). Unset sizes come from `tuning.py`.
    interpret: True or a `pltpu.InterpretParams` runs the TPU interpreter (CPU); so does
    tracing under `pltpu.force_tpu_interpret_mode()`.
    """
    validate_inputs(q, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs)
    validate_kernel_args(q, kv_cache, page_indices, sliding_window, soft_cap)
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens == 0:
        return jnp.zeros(q.shape, q.dtype)
    num_pages, page_size, kv_heads2, row_width = kv_cache.shape
    scale_elements = row_width - head_dim  # SCALE_ELEMENTS for an 8-bit cache, else 0
    num_kv_heads = kv_heads2 // 2
    group = num_heads // num_kv_heads
    max_num_seqs, pages_per_seq = page_indices.shape
    if None in (block_q, block_kv_pages, block_kv_heads):
        tuned = tuning.tpu_block_sizes(
            head_dim=head_dim,
            page_size=page_size,
            dtype=q.dtype,
            group=group,
            num_kv_heads=num_kv_heads,
            num_tokens=num_tokens,
            pages_per_seq=pages_per_seq,
        )
        block_q = block_q or tuned.block_q
        block_kv_pages = block_kv_pages or tuned.block_kv_pages
        block_kv_heads = block_kv_heads or tuned.block_kv_heads
    if block_q < 1 or block_kv_pages < 1:
        raise ValueError(f"block_q={block_q} and block_kv_pages={block_kv_pages} must be >= 1")
    if num_kv_heads % block_kv_heads:
        raise ValueError(f"block_kv_heads={block_kv_heads} must divide K={num_kv_heads}")
    block_kv_pages = min(block_kv_pages, pages_per_seq)
    num_q_blocks = -(-num_tokens // block_q)
    padded_tokens = num_q_blocks * block_q
    rows = block_q * group

    # [T, N, H] -> [K, T*G, H]: one kv head's query heads become rows (token-major).
    q_rows = jnp.pad(q, ((0, padded_tokens - num_tokens), (0, 0), (0, 0)))
    q_rows = q_rows.reshape(padded_tokens, num_kv_heads, group, head_dim).transpose(1, 0, 2, 3)
    q_rows = q_rows.reshape(num_kv_heads, padded_tokens * group, head_dim)
    kv_rows = kv_cache.reshape(num_pages, page_size, kv_heads2 * row_width)  # [P, ps, 2K*W]
    # The sequence owning each block's first row (num_seqs when the block is all padding).
    seq_ends = jnp.where(
        jnp.arange(max_num_seqs) < num_seqs[0], cu_q_lens[1:], jnp.iinfo(jnp.int32).max
    )
    block_starts = jnp.arange(num_q_blocks, dtype=jnp.int32) * block_q
    first_seq = jnp.searchsorted(seq_ends, block_starts, side="right").astype(jnp.int32)

    block = pl.BlockSpec((block_kv_heads, rows, head_dim), lambda h, i, *_: (h, i, 0))
    kernel = functools.partial(
        _attention_kernel,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
        group=group,
        page_size=page_size,
        pages_per_block=block_kv_pages,
        pages_per_seq=pages_per_seq,
        scale_elements=scale_elements,
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(num_kv_heads // block_kv_heads, num_q_blocks),
            in_specs=[block, pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=block,
            scratch_shapes=[
                pltpu.VMEM(
                    (2, block_kv_pages * page_size, 2 * block_kv_heads * row_width),
                    kv_cache.dtype,
                ),
                pltpu.SemaphoreType.DMA((2,)),
                pltpu.VMEM((block_kv_heads, rows, LANES), jnp.float32),
                pltpu.VMEM((block_kv_heads, rows, LANES), jnp.float32),
                pltpu.VMEM((block_kv_heads, rows, head_dim), jnp.float32),
            ],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        out_shape=jax.ShapeDtypeStruct(q_rows.shape, q.dtype),
        interpret=pltpu.InterpretParams() if interpret is True else interpret,
        name="xlaserve_ragged_paged_attention",
    )(
        kv_lens,
        page_indices.reshape(-1),
        cu_q_lens,
        num_seqs,
        first_seq,
        q_rows,
        kv_rows,
    )  # [K, Tp*G, H]
    out = out.reshape(num_kv_heads, padded_tokens, group, head_dim).transpose(1, 0, 2, 3)
    return out.reshape(padded_tokens, num_heads, head_dim)[:num_tokens]
