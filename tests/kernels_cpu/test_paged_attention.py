"""The CPU ragged paged attention kernel (xlaserve/kernels_cpu/attention.cc) against the
plain-jnp reference, on the ragged NaN-guarded batches of
tests/kernels/test_ragged_paged_attention_kernels.py (decode, prefill and chunked prefill
around page edges, empty and padding sequences, shuffled page tables, NaN in every unused
page and padding row), plus query runs longer than one work item, sliding windows and soft
caps, and whole models on the kernel against the reference attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.kernels.test_ragged_paged_attention_kernels import (
    HEADS,
    assert_matches_reference,
    make_batch,
    mixed_seqs,
)
from tests.kernels_cpu.test_skinny_matmul import tiny
from xlaserve.kernels_cpu import attention as cpu_attention
from xlaserve.models.generate import PagedModelRunner

pytestmark = pytest.mark.skipif(
    not cpu_attention.available(), reason="the CPU kernels are not built here (no C++ compiler)"
)
kernel = jax.jit(
    cpu_attention.ragged_paged_attention, static_argnames=("sm_scale", "sliding_window", "soft_cap")
)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("page_size", [16, 32, 128])
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("head_dim", [64, 80, 128, 256])
def test_kernel_matches_reference(dtype, page_size, heads, head_dim):
    args, num_real = make_batch(
        mixed_seqs(page_size), heads=heads, head_dim=head_dim, page_size=page_size, dtype=dtype
    )
    options = dict(sm_scale=head_dim**-0.5)
    assert_matches_reference(kernel(*args, **options), args, num_real, options)


@pytest.mark.parametrize(
    "window,cap", [(None, None), (5, None), (40, 2.0), (1000, 0.5), (None, 30.0)]
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_long_prefill_windows_and_caps(window, cap, dtype):
    """Query runs of 70 and 33 rows (three and two work items), chunked after a prefix."""
    seqs = [(70, 70), (1, 50), (33, 90), (0, 0), (1, 1)]
    args, num_real = make_batch(seqs, heads="gqa3", head_dim=64, page_size=16, dtype=dtype)
    options = dict(sm_scale=0.125, sliding_window=window, soft_cap=cap)
    assert_matches_reference(kernel(*args, **options), args, num_real, options)


def test_head_dims_the_kernel_does_not_tile_stay_on_the_reference():
    assert cpu_attention.supports(64) and cpu_attention.supports(256)
    assert not cpu_attention.supports(72)
    assert cpu_attention.reads(jnp.float32) and cpu_attention.reads(jnp.bfloat16)
    assert not cpu_attention.reads(jnp.int8) and not cpu_attention.reads(jnp.float8_e4m3fn)


@pytest.mark.parametrize("preset", ["smollm2-135m", "gemma-3-270m"])
def test_model_on_the_kernel_matches_the_reference_attention(preset):
    """A per-layer model takes the kernel for "auto" attention; prefill and decode logits
    match the same model on the reference (Gemma: sliding layers, soft caps)."""
    model_cls, config = tiny(preset)
    models = []
    for backend in ("auto", "reference"):
        model = model_cls(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
        model.attention_backend = backend
        model.unstack_layers()
        models.append(model)
    assert models[0].attention_backend == cpu_attention.BACKEND
    assert models[1].attention_backend == "reference"
    runs = [PagedModelRunner(m, num_seqs=2, max_len=96) for m in models]
    new = [list(range(3, 40)), [200, 11]]
    for _ in range(4):
        outs = [r.step(new) for r in runs]
        a, b = outs[0].logits, outs[1].logits
        np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max(), rtol=0)
        new = [[int(t)] for t in np.argmax(b, axis=-1)]
