"""The TPU KV-cache write kernel equals the reference scatter exactly.

Runs in the TPU interpreter on CPU ("interpret") and on a real TPU when one is visible
("device", marker `tpu`); see conftest.py. Every case writes ragged rows into shuffled slots
across page boundaries, with padding rows (-1) and a slot past the cache (both skipped), into
a cache whose other slots hold NaN, which must stay bit-for-bit as they were.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels.conftest import FULL_GRID, modes, tpu_mode
from xlaserve.kernels_pallas.kv_cache_update import kv_cache_update, reference, tpu


def make_update(*, num_tokens, page_size, num_kv_heads, head_dim, dtype, seed=0):
    rng = np.random.default_rng(seed)
    num_pages = -(-num_tokens // page_size) + 3
    cache = rng.standard_normal((num_pages, page_size, 2 * num_kv_heads, head_dim))
    cache[rng.random(cache.shape[:2]) < 0.5] = np.nan  # half the slots: untouchable NaN
    new_kv = rng.standard_normal((num_tokens, 2 * num_kv_heads, head_dim))
    # Distinct slots (a slot belongs to one token), in shuffled order.
    slots = rng.permutation(np.arange(page_size + 1, num_pages * page_size))[:num_tokens]
    slots = slots.astype(np.int32)
    if num_tokens >= 4:
        slots[1:3] = [page_size - 1, page_size]  # the last slot of page 0, the first of page 1
        slots[0] = slots[num_tokens // 2] = -1  # padding rows
        slots[-1] = num_pages * page_size + 2  # past the cache: dropped like the scatter does
    return (
        jnp.asarray(new_kv, jnp.float32),  # written in the cache's dtype
        jnp.asarray(cache, dtype),
        jnp.asarray(slots),
    )


def assert_same_bits(got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


CASES = [
    # (T, page_size, K, H, dtype, block_tokens)
    (21, 16, 2, 64, "float32", 8),
    (7, 32, 1, 128, "bfloat16", 64),
    (33, 128, 4, 256, "bfloat16", 16),
    (1, 16, 2, 64, "float32", 1),
]
if FULL_GRID:
    CASES = list(
        itertools.product(
            (1, 17, 64), (16, 32, 128), (1, 2, 8), (64, 128, 256), ("float32", "bfloat16"), (1, 64)
        )
    )


@pytest.mark.parametrize("mode", modes("tpu"))
@pytest.mark.parametrize(
    "num_tokens,page_size,num_kv_heads,head_dim,dtype,block_tokens",
    [pytest.param(*c, id="-".join(map(str, c))) for c in CASES],
)
def test_tpu_update_equals_reference_exactly(
    mode, num_tokens, page_size, num_kv_heads, head_dim, dtype, block_tokens
):
    new_kv, cache, slots = make_update(
        num_tokens=num_tokens,
        page_size=page_size,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        dtype=dtype,
    )
    want = reference.kv_cache_update(new_kv, cache, slots)
    with tpu_mode(mode):
        got = tpu.kv_cache_update(new_kv, cache, slots, block_tokens=block_tokens)
    assert_same_bits(got, want)
    # The rows really landed (a kernel that wrote nothing would fail here).
    slots = np.asarray(slots)
    written = slots[(slots >= 0) & (slots < cache.shape[0] * page_size)]
    flat = np.asarray(got.astype(jnp.float32)).reshape(-1, *cache.shape[2:])
    assert written.size and not np.isnan(flat[written]).any()


def test_all_padding_leaves_the_cache_untouched():
    new_kv, cache, _ = make_update(
        num_tokens=5, page_size=16, num_kv_heads=1, head_dim=64, dtype="float32"
    )
    slots = jnp.full((5,), -1, jnp.int32)
    got = tpu.kv_cache_update(new_kv, cache, slots, interpret=True)
    assert_same_bits(got, cache)


def test_dispatcher_picks_reference_on_cpu_and_runs_the_kernel_when_asked():
    new_kv, cache, slots = make_update(
        num_tokens=9, page_size=16, num_kv_heads=2, head_dim=64, dtype="float32"
    )
    want = reference.kv_cache_update(new_kv, cache, slots)
    assert_same_bits(kv_cache_update(new_kv, cache, slots), want)
    assert_same_bits(kv_cache_update(new_kv, cache, slots, impl="tpu", interpret=True), want)
    with pytest.raises(ValueError, match="choose from"):
        kv_cache_update(new_kv, cache, slots, impl="gpu")


def test_bad_shapes_are_named():
    new_kv, cache, slots = make_update(
        num_tokens=4, page_size=16, num_kv_heads=2, head_dim=64, dtype="float32"
    )
    with pytest.raises(ValueError, match=r"new_kv must be \[T, 4, 64\]"):
        tpu.kv_cache_update(new_kv[:, :2], cache, slots)
    with pytest.raises(ValueError, match=r"slot_mapping must be \[T=4\]"):
        tpu.kv_cache_update(new_kv, cache, slots[:3])
    with pytest.raises(ValueError, match="block_tokens"):
        tpu.kv_cache_update(new_kv, cache, slots, block_tokens=0)


@pytest.mark.parametrize("slot", [5, -1])
def test_one_row_write_updates_the_donated_cache_in_place(slot):
    # XLA turns a one-row scatter into a bounds-checked dynamic-update-slice that copies the
    # whole cache; the reference keeps it a scatter (a batch-1 decode step writes one row per
    # layer, so a copy per layer cost seconds per step).
    cache = jnp.arange(64 * 4 * 2 * 8, dtype=jnp.float32).reshape(64, 4, 2, 8)
    new_kv = jnp.full((1, 2, 8), -1.0)
    slots = jnp.array([slot], jnp.int32)
    update = jax.jit(reference.kv_cache_update, donate_argnums=(1,))
    hlo = update.lower(new_kv, cache, slots).compile().as_text()
    assert "f32[256,2,8]{2,1,0} copy(" not in hlo and "f32[64,4,2,8]{3,2,1,0} copy(" not in hlo
    want = np.asarray(cache).reshape(256, 2, 8).copy()
    if slot >= 0:
        want[slot] = -1.0
    got = update(new_kv, cache, slots)
    np.testing.assert_array_equal(np.asarray(got).reshape(256, 2, 8), want)
