"""KV-cache write as a Mosaic TPU Pallas kernel: one HBM->HBM DMA per new token row.

Same contract as `reference.py`. The cache is aliased to the output, so under jit with
donation it is updated in place; only the written rows move. Slots are scalar-prefetched
into SMEM. A grid step issues the DMAs of `block_tokens` rows on one semaphore, then waits
for all of them, so the copies overlap each other. Rows whose slot is -1 (padding) or past
the cache are skipped, as the reference's scatter drops them.

Axis letters (docs/glossary.md): T tokens, K kv heads, H head dim, P pages.
Runs on CPU under `jax.experimental.pallas.tpu.force_tpu_interpret_mode()` or with
`interpret=True` / a `pltpu.InterpretParams`.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from xlaserve.kernels_pallas.kv_cache_update.reference import validate_inputs

DEFAULT_BLOCK_TOKENS = 64


def _update_kernel(
    slots_ref,  # i32[T] (SMEM)
    new_kv_ref,  # [T, 2K*H] (HBM)
    cache_in_ref,  # [P, page_size, 2K*H] (HBM), aliased with out_ref
    out_ref,  # [P, page_size, 2K*H] (HBM)
    sem,  # one DMA semaphore
    *,
    block_tokens: int,
):
    del cache_in_ref  # aliased: out_ref already holds the cache
    num_tokens = new_kv_ref.shape[0]
    num_pages, page_size, _ = out_ref.shape
    first = pl.program_id(0) * block_tokens

    def row_copy(i):
        t = jnp.minimum(first + i, num_tokens - 1)
        slot = slots_ref[t]
        live = (first + i < num_tokens) & (slot >= 0) & (slot < num_pages * page_size)
        slot = jnp.where(live, slot, 0)
        page, offset = lax.div(slot, page_size), lax.rem(slot, page_size)
        copy = pltpu.make_async_copy(
            new_kv_ref.at[pl.ds(t, 1)], out_ref.at[page, pl.ds(offset, 1)], sem
        )
        return live, copy

    def start(i, carry):
        live, copy = row_copy(i)
        pl.when(live)(copy.start)
        return carry

    def wait(i, carry):
        live, copy = row_copy(i)
        pl.when(live)(copy.wait)
        return carry

    lax.fori_loop(0, block_tokens, start, 0)
    lax.fori_loop(0, block_tokens, wait, 0)


@functools.partial(jax.jit, static_argnames=("block_tokens", "interpret"))
def kv_cache_update(
    new_kv: jax.Array,
    kv_cache: jax.Array,
    slot_mapping: jax.Array,
    *,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """Writes `new_kv[t]` to flat slot `slot_mapping[t]` (page * page_size + offset).

    new_kv: [T, 2K, H]; kv_cache: [P, page_size, 2K, H]; slot_mapping: i32[T], -1 = padding.
    Returns the updated cache; donate kv_cache under jit to update it in place.
    block_tokens: rows whose DMAs are in flight together per grid step.
    """
    validate_inputs(new_kv, kv_cache, slot_mapping)
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens}")
    num_tokens = new_kv.shape[0]
    if num_tokens == 0:
        return kv_cache
    num_pages, page_size, kv_heads2, head_dim = kv_cache.shape
    rows = new_kv.astype(kv_cache.dtype).reshape(num_tokens, kv_heads2 * head_dim)  # [T, 2K*H]
    cache = kv_cache.reshape(num_pages, page_size, kv_heads2 * head_dim)  # [P, ps, 2K*H]
    block_tokens = min(block_tokens, num_tokens)
    any_space = pl.BlockSpec(memory_space=pl.ANY)
    out = pl.pallas_call(
        functools.partial(_update_kernel, block_tokens=block_tokens),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(-(-num_tokens // block_tokens),),
            in_specs=[any_space, any_space],
            out_specs=any_space,
            scratch_shapes=[pltpu.SemaphoreType.DMA(())],
        ),
        out_shape=jax.ShapeDtypeStruct(cache.shape, cache.dtype),
        input_output_aliases={2: 0},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=pltpu.InterpretParams() if interpret is True else interpret,
        name="xlaserve_kv_cache_update",
    )(slot_mapping.astype(jnp.int32), rows, cache)
    return out.reshape(kv_cache.shape)
