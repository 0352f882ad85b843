"""The TPU and GPU ragged paged attention kernels against the plain-jnp reference.

The reference itself is checked against cases worked out by hand in test_reference.py; here
the same hand-worked decode case runs through both kernels, then each kernel is compared with
the reference over a grid of dtype x page size x heads (G = N // K of 1, 2, 3, 4 and MQA) x
head dim x block sizes. Every batch is ragged and mixes decode, prefill and chunked prefill
with lengths 0, 1 and page boundaries +-1, under a shuffled page table. Unused pages are NaN,
and unused page-table entries and the padding sequences past num_seqs point anywhere, NaN
pages included; query padding rows hold NaN too and must come out exactly zero. int8 and
float8 caches (rows ending in their scales) run through both kernels against the reference
reading the same stored rows.

Modes (see conftest.py): "interpret" runs on CPU in CI, "device" on a real TPU/GPU when one is
visible (markers `tpu`, `gpu`). The default grid is a subset that covers every value of every
axis (this file and test_kv_cache_update_kernels.py: about 1.5 CPU-minutes on 2 cores, a
third of it the SmolLM2 parity test). The full product (2 dtypes x page sizes 16/32/128 x 5
head layouts x H 64/128/256 x 4 block-size presets per kernel, 6 window/cap cases per dtype,
and the KV-update grid: about 1,070 interpreted runs, roughly an hour on 2 busy cores) runs
with `XLASERVE_FULL_KERNEL_GRID=1 pytest tests/kernels`; add `-k gpu_kernel` or
`-k tpu_kernel` to sweep one kernel.

Tolerances, against the float32-accumulating reference: float32 atol = rtol = 2e-5 (only the
summation order differs); bfloat16 atol = rtol = 2e-2 (both round the output to bfloat16,
about 2^-8 relative, and the kernels feed bfloat16 probabilities to the P @ V product).
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.kernels.conftest import FULL_GRID, modes, tpu_mode
from xlaserve.kernels_pallas.ragged_paged_attention import (
    gpu,
    reference,
    resolve_impl,
    tpu,
    tuning,
)
from xlaserve.models.attention import AttentionMetadata, resolve_backend, write_and_attend
from xlaserve.quantization.kv_cache import SCALE_ELEMENTS, quantize_kv

TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2}
HEADS = {"mha": (2, 2), "gqa2": (4, 2), "gqa3": (6, 2), "gqa4": (8, 2), "mqa": (4, 1)}
TPU_BLOCKS = {
    "q8-p1-h1": dict(block_q=8, block_kv_pages=1, block_kv_heads=1),
    "q16-p2": dict(block_q=16, block_kv_pages=2),
    "q4-p3": dict(block_q=4, block_kv_pages=3),
    "tuned": {},
}
GPU_BLOCKS = {
    "r16-kv16": dict(block_rows=16, block_kv=16, kv_splits=1),
    "r32-kv32-s3": dict(block_rows=32, block_kv=32, kv_splits=3),
    "r64-kv64-s2": dict(block_rows=64, block_kv=64, kv_splits=2),
    "tuned": {},
}


def mixed_seqs(page_size: int) -> list[tuple[int, int]]:
    """(q_len, kv_len) per sequence: decode, prefill and chunked prefill around page edges."""
    ps = page_size
    if ps >= 64:  # keep T small: decode-heavy, still crossing page boundaries
        return [(1, 1), (1, ps - 1), (0, 0), (1, ps + 1), (5, 2 * ps), (2, 2 * ps + 1)]
    return [
        (1, ps + 1),  # decode one past a page boundary
        (0, 0),  # empty sequence
        (ps - 1, ps - 1),  # prefill one short of a page
        (1, 1),  # decode of the very first token
        (3, 2 * ps),  # chunked prefill ending on a page boundary
        (ps + 1, ps + 1),  # prefill one past a page boundary
        (2, 2 * ps - 1),  # chunked prefill ending one short of a page boundary
        (1, 3 * ps),  # decode on a page boundary, several KV blocks
    ]


def make_batch(seqs, *, heads, head_dim, page_size, dtype, seed=0, pad_seqs=2, pad_tokens=3):
    """Reference-contract arguments for `seqs`, with NaN wherever nothing may be read.

    heads: a HEADS name or (N, K).
    """
    rng = np.random.default_rng(seed)
    num_heads, num_kv_heads = HEADS.get(heads, heads)
    used = [-(-kv // page_size) for _, kv in seqs]
    pages_per_seq = max(used) + 1
    num_pages = sum(used) + 4
    kv_cache = np.full((num_pages, page_size, 2 * num_kv_heads, head_dim), np.nan, np.float32)
    max_num_seqs = len(seqs) + pad_seqs
    # Unused entries (and padding sequences) point anywhere, NaN pages included.
    page_indices = rng.integers(0, num_pages, (max_num_seqs, pages_per_seq)).astype(np.int32)
    shuffled = iter(rng.permutation(num_pages))
    for s, n in enumerate(used):
        for j in range(n):
            page = next(shuffled)
            page_indices[s, j] = page
            kv_cache[page] = rng.standard_normal(kv_cache.shape[1:])
    q_lens = np.array([q for q, _ in seqs], np.int32)
    kv_lens = np.full(max_num_seqs, 3, np.int32)  # padding sequences: nonzero garbage
    kv_lens[: len(seqs)] = [kv for _, kv in seqs]
    cu_q_lens = np.zeros(max_num_seqs + 1, np.int32)
    cu_q_lens[1 : len(seqs) + 1] = np.cumsum(q_lens)
    cu_q_lens[len(seqs) + 1 :] = cu_q_lens[len(seqs)]
    num_real = int(q_lens.sum())
    q = np.full((num_real + pad_tokens, num_heads, head_dim), np.nan, np.float32)
    q[:num_real] = rng.standard_normal(q[:num_real].shape)
    args = (
        jnp.asarray(q, dtype),
        jnp.asarray(kv_cache, dtype),
        jnp.asarray(kv_lens),
        jnp.asarray(page_indices),
        jnp.asarray(cu_q_lens),
        jnp.asarray([len(seqs)], jnp.int32),
    )
    return args, num_real


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap"))
def reference_jit(*args, **options):
    return reference.ragged_paged_attention(*args, **options)


def assert_matches_reference(out, args, num_real, options):
    expected = reference_jit(*args, **options)
    out = np.asarray(out.astype(jnp.float32))
    expected = np.asarray(expected.astype(jnp.float32))
    assert not np.isnan(expected).any()
    assert not np.isnan(out).any(), "a NaN page or padding row leaked into the output"
    tol = TOLERANCE[args[0].dtype.name]
    np.testing.assert_allclose(out[:num_real], expected[:num_real], atol=tol, rtol=tol)
    np.testing.assert_array_equal(out[num_real:], 0.0)  # padding rows


def run_tpu(mode, args, **kwargs):
    with tpu_mode(mode):
        return tpu.ragged_paged_attention(*args, **kwargs)


def run_gpu(mode, args, **kwargs):
    return gpu.ragged_paged_attention(*args, **kwargs, interpret=mode == "interpret")


KERNELS = {"tpu": (run_tpu, TPU_BLOCKS), "gpu": (run_gpu, GPU_BLOCKS)}


def grid_cases(kernel: str, default: list[tuple]) -> list:
    """The CI subset, or with XLASERVE_FULL_KERNEL_GRID=1 the full product."""
    cases = default
    if FULL_GRID:
        dtypes, page_sizes, head_dims = ("float32", "bfloat16"), (16, 32, 128), (64, 128, 256)
        cases = itertools.product(dtypes, page_sizes, HEADS, head_dims, KERNELS[kernel][1])
    return [pytest.param(*c, id="-".join(map(str, c))) for c in cases]


# (dtype, page size, heads, head dim, block sizes): every value of every axis at least once.
TPU_CASES = [
    ("float32", 16, "mha", 64, "q8-p1-h1"),
    ("bfloat16", 16, "gqa2", 128, "q16-p2"),
    ("float32", 32, "gqa4", 128, "q4-p3"),
    ("bfloat16", 32, "mqa", 64, "tuned"),
    ("float32", 16, "gqa3", 256, "q16-p2"),
    ("bfloat16", 128, "gqa4", 128, "q8-p1-h1"),
]
GPU_CASES = [
    ("float32", 16, "mha", 64, "r16-kv16"),
    ("bfloat16", 16, "gqa2", 128, "r32-kv32-s3"),
    ("float32", 32, "gqa4", 128, "r64-kv64-s2"),
    ("bfloat16", 32, "mqa", 64, "tuned"),
    ("float32", 16, "gqa3", 256, "r32-kv32-s3"),
    ("bfloat16", 128, "gqa4", 128, "r16-kv16"),
]


@pytest.mark.slow
@pytest.mark.parametrize("mode", modes("tpu"))
@pytest.mark.parametrize("dtype,page_size,heads,head_dim,blocks", grid_cases("tpu", TPU_CASES))
def test_tpu_kernel_matches_reference(mode, dtype, page_size, heads, head_dim, blocks):
    args, num_real = make_batch(
        mixed_seqs(page_size), heads=heads, head_dim=head_dim, page_size=page_size, dtype=dtype
    )
    options = dict(sm_scale=head_dim**-0.5)
    out = run_tpu(mode, args, **options, **TPU_BLOCKS[blocks])
    assert_matches_reference(out, args, num_real, options)


@pytest.mark.slow
@pytest.mark.parametrize("mode", modes("gpu"))
@pytest.mark.parametrize("dtype,page_size,heads,head_dim,blocks", grid_cases("gpu", GPU_CASES))
def test_gpu_kernel_matches_reference(mode, dtype, page_size, heads, head_dim, blocks):
    args, num_real = make_batch(
        mixed_seqs(page_size), heads=heads, head_dim=head_dim, page_size=page_size, dtype=dtype
    )
    options = dict(sm_scale=head_dim**-0.5)
    out = run_gpu(mode, args, **options, **GPU_BLOCKS[blocks])
    assert_matches_reference(out, args, num_real, options)


def quantize_cache(args, kind: str):
    """The batch with its cache stored as an 8-bit cache with row scales (NaN pages stay
    garbage: their scales are NaN)."""
    q, kv_cache, *rest = args
    num_pages, page_size, kv_heads2, head_dim = kv_cache.shape
    rows = kv_cache.reshape(-1, kv_heads2, head_dim).astype(jnp.float32)
    stored = quantize_kv(rows, QUANTIZED_KV[kind])
    return (q, stored.reshape(num_pages, page_size, kv_heads2, head_dim + SCALE_ELEMENTS), *rest)


QUANTIZED_KV = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
# (kernel, 8-bit kind, q dtype, page size, heads, head dim, block sizes)
QUANTIZED_CASES = [
    ("tpu", "int8", "float32", 16, "gqa2", 64, "q16-p2"),
    ("tpu", "fp8", "bfloat16", 32, "mqa", 128, "q8-p1-h1"),
    ("gpu", "int8", "bfloat16", 16, "gqa3", 64, "r32-kv32-s3"),
    ("gpu", "fp8", "float32", 32, "gqa4", 128, "r16-kv16"),
]


@pytest.mark.slow
@pytest.mark.parametrize("kernel,kind,dtype,page_size,heads,head_dim,blocks", QUANTIZED_CASES)
def test_kernels_read_an_8bit_cache_like_the_reference(
    kernel, kind, dtype, page_size, heads, head_dim, blocks
):
    # Both read the same stored values and scales: float32 queries match to summation order,
    # bfloat16 ones within bfloat16 rounding of the dequantized rows (same tolerances).
    args, num_real = make_batch(
        mixed_seqs(page_size), heads=heads, head_dim=head_dim, page_size=page_size, dtype=dtype
    )
    args = quantize_cache(args, kind)
    run, presets = KERNELS[kernel]
    options = dict(sm_scale=head_dim**-0.5)
    out = run("interpret", args, **options, **presets[blocks])
    assert_matches_reference(out, args, num_real, options)


# A window inside a page, one spanning pages with a cap that binds, one longer than any
# sequence (same as none) with a tight cap; the full grid adds more.
FEATURES = [
    pytest.param(5, None, id="window5"),
    pytest.param(20, 2.0, id="window20-cap2"),
    pytest.param(1000, 1.0, id="window1000-cap1"),
]
if FULL_GRID:
    FEATURES += [
        pytest.param(None, 2.0, id="cap2"),
        pytest.param(7, 30.0, id="window7-cap30"),
        pytest.param(1, None, id="window1"),
    ]
FEATURE_DTYPES = ("float32", "bfloat16") if FULL_GRID else ("float32",)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
@pytest.mark.parametrize("dtype", FEATURE_DTYPES)
@pytest.mark.parametrize("sliding_window,soft_cap", FEATURES)
def test_sliding_window_and_soft_cap(kernel, dtype, sliding_window, soft_cap):
    run, block_presets = KERNELS[kernel]
    blocks = list(block_presets.values())[1]  # several KV blocks per sequence
    args, num_real = make_batch(
        mixed_seqs(16), heads="gqa2", head_dim=64, page_size=16, dtype=dtype, seed=1
    )
    options = dict(sm_scale=0.125, sliding_window=sliding_window, soft_cap=soft_cap)
    out = run("interpret", args, **options, **blocks)
    assert_matches_reference(out, args, num_real, options)


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
@pytest.mark.parametrize("mode", ["interpret"])
def test_hand_worked_decode(kernel, mode):
    # As in test_reference.py, zero-padded to H = 16: q = e0 sees k0 = 0 and k1 = ln3 * e0,
    # scores (0, ln3) -> softmax (1/4, 3/4) -> out = 1/4 v0 + 3/4 v1 = [0.25, 0.75, 0, ...].
    # Pages 0 and 2 are NaN; the page table's unused entry points at page 2.
    cache = np.full((3, 16, 2, 16), np.nan, np.float32)  # [P, ps, 2K, H]
    cache[1] = 0.0
    cache[1, 0, 1, 0] = 1.0  # v0 = e0
    cache[1, 1, 0, 0] = math.log(3.0)  # k1 = ln3 * e0
    cache[1, 1, 1, 1] = 1.0  # v1 = e1
    q = np.zeros((2, 1, 16), np.float32)
    q[:, 0, 0] = 1.0
    args = (
        jnp.asarray(q),
        jnp.asarray(cache),
        jnp.asarray([2], jnp.int32),
        jnp.asarray([[1, 2]], jnp.int32),
        jnp.asarray([0, 1], jnp.int32),
        jnp.asarray([1], jnp.int32),
    )
    out = np.asarray(KERNELS[kernel][0](mode, args))
    np.testing.assert_allclose(out[0, 0, :2], [0.25, 0.75], atol=1e-6)
    np.testing.assert_array_equal(out[0, 0, 2:], 0.0)
    np.testing.assert_array_equal(out[1], 0.0)  # padding row


def test_tpu_kernel_double_buffer_is_race_free():
    # The interpreter's happens-before race detector watches every DMA and VMEM access:
    # fetching the next block into one half of the buffer while the other is read must not
    # race. (Interpreter params passed straight to the kernel, not through the context.)
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call
    from jax.experimental.pallas import tpu as pltpu

    args, num_real = make_batch(
        mixed_seqs(16), heads="gqa2", head_dim=64, page_size=16, dtype="float32"
    )
    params = pltpu.InterpretParams(detect_races=True, dma_execution_mode="eager")
    try:
        out = tpu.ragged_paged_attention(*args, block_q=8, block_kv_pages=2, interpret=params)
        assert not interpret_pallas_call.races.races_found
    finally:
        pltpu.reset_tpu_interpret_mode_state()
    assert_matches_reference(out, args, num_real, {})


def test_tuned_block_sizes_follow_the_shape():
    # The exact table entry, fitted to the call: block_q shrinks to the (pow2) token count.
    sizes = tuning.tpu_block_sizes(
        head_dim=128,
        page_size=16,
        dtype=jnp.bfloat16,
        group=4,
        num_kv_heads=8,
        num_tokens=5,
        pages_per_seq=64,
    )
    assert sizes == tuning.TpuBlockSizes(block_q=8, block_kv_pages=16, block_kv_heads=8)
    # A VMEM-hungry shape (f32, H = 256, 64 kv heads) splits the kv heads to fit the buffer.
    big = tuning.tpu_block_sizes(
        head_dim=256,
        page_size=128,
        dtype=jnp.float32,
        group=1,
        num_kv_heads=64,
        num_tokens=512,
        pages_per_seq=64,
    )
    buffer = 2 * big.block_kv_pages * 128 * 2 * big.block_kv_heads * 256 * 4
    assert big.block_kv_heads < 64 and buffer <= tuning.TPU_KV_BUFFER_BYTES
    # GPU: rows hold all G heads; few long decodes get split across programs, many do not.
    gpu_sizes = functools.partial(
        tuning.gpu_block_sizes,
        head_dim=128,
        page_size=16,
        dtype=jnp.bfloat16,
        num_kv_heads=8,
        pages_per_seq=2048,
    )
    assert gpu_sizes(group=32, num_tokens=4, max_num_seqs=4).block_rows >= 32
    assert gpu_sizes(group=4, num_tokens=4, max_num_seqs=4).kv_splits > 1
    assert gpu_sizes(group=4, num_tokens=256, max_num_seqs=256).kv_splits == 1


@pytest.mark.parametrize("cache", ["bfloat16", "int8", "fp8"])
@pytest.mark.parametrize(
    "kernel,platform", [("tpu", "tpu"), ("gpu", "cuda")], ids=["mosaic", "triton"]
)
def test_kernel_lowers_for_its_accelerator(kernel, platform, cache):
    # Lowering (Pallas -> Mosaic / Triton IR) runs on the CPU host; it rejects primitives a
    # kernel cannot use on the real chip, which the interpreters accept (Triton has no fill
    # value cast to float8, for one).
    args, _ = make_batch(mixed_seqs(16), heads="gqa3", head_dim=128, page_size=16, dtype="bfloat16")
    if cache != "bfloat16":
        args = quantize_cache(args, cache)
    fn = {"tpu": tpu, "gpu": gpu}[kernel].ragged_paged_attention
    blocks = list(KERNELS[kernel][1].values())[1]
    lowered = (
        jax.jit(functools.partial(fn, sm_scale=0.1, sliding_window=8, soft_cap=5.0, **blocks))
        .trace(*args)
        .lower(lowering_platforms=(platform,))
    )
    assert "xlaserve_ragged_paged_attention" in lowered.as_text()


def small_args(dtype="float32", head_dim=64, heads="gqa2"):
    return make_batch([(2, 5)], heads=heads, head_dim=head_dim, page_size=16, dtype=dtype)[0]


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: tpu.ragged_paged_attention(*small_args("float16")), "float32 or bfloat16"),
        (lambda: gpu.ragged_paged_attention(*small_args("float16")), "float32 or bfloat16"),
        (lambda: gpu.ragged_paged_attention(*small_args(head_dim=80)), "power of two"),
        (lambda: gpu.ragged_paged_attention(*small_args(), block_rows=24), "block_rows"),
        (lambda: gpu.ragged_paged_attention(*small_args(), block_kv=8), "block_kv"),
        (
            lambda: gpu.ragged_paged_attention(*small_args(heads=(32, 1)), block_rows=16),
            "block_rows",
        ),
        (lambda: tpu.ragged_paged_attention(*small_args(), block_kv_heads=3), "divide K"),
        (lambda: tpu.ragged_paged_attention(*small_args(), sliding_window=0), "sliding_window"),
        (lambda: gpu.ragged_paged_attention(*small_args(), soft_cap=-1.0), "soft_cap"),
    ],
)
def test_bad_arguments_raise_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_mismatched_kv_dtype_is_named():
    q, kv, *rest = small_args()
    with pytest.raises(ValueError, match="bfloat16 must equal q dtype float32"):
        tpu.ragged_paged_attention(q, kv.astype(jnp.bfloat16), *rest)


def test_backend_selection():
    assert resolve_backend("auto", "cpu") == "reference"
    assert resolve_backend("auto", "gpu") == "gpu"
    assert resolve_backend("auto", "tpu") == "tpu"
    assert resolve_impl("tpu", "cpu") == "tpu"  # the interpreter
    with pytest.raises(ValueError, match=r"choose from \('auto', 'reference', 'tpu', 'gpu'\)"):
        resolve_backend("flash")
    with pytest.raises(ValueError, match="cannot run on platform 'gpu'"):
        resolve_backend("tpu", "gpu")


@pytest.mark.slow
@pytest.mark.parametrize("cache_dtype", ["float32", "int8"])
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_write_and_attend_backends_match_reference(backend, cache_dtype):
    # Three layers; the write goes to layer 1's pages only and attention reads only them.
    # Layers 0 and 2 are NaN: touching another layer's pages shows in the output.
    rng = np.random.default_rng(2)
    num_layers, num_pages, page_size, num_kv_heads, head_dim = 3, 6, 16, 2, 64
    cache = np.full((num_layers, num_pages, page_size, 2 * num_kv_heads, head_dim), np.nan)
    cache[1] = rng.standard_normal(cache.shape[1:])
    kv_cache = jnp.asarray(cache, jnp.float32)
    if cache_dtype == "int8":  # stored rows with scales; the new tokens are quantized on write
        kv_cache = quantize_kv(kv_cache.reshape(-1, 2 * num_kv_heads, head_dim), jnp.int8)
        kv_cache = kv_cache.reshape(*cache.shape[:-1], head_dim + SCALE_ELEMENTS)
    # Seq 0 prefills 5 tokens into page 4; seq 1 decodes its 18th token (pages 2, 0).
    slots = np.array([4 * 16 + i for i in range(5)] + [0 * 16 + 1, -1, -1], np.int32)
    metadata = AttentionMetadata(
        slot_mapping=jnp.asarray(slots),
        cu_q_lens=jnp.asarray([0, 5, 6], jnp.int32),
        kv_lens=jnp.asarray([5, 18], jnp.int32),
        page_indices=jnp.asarray([[4, 5], [2, 0]], jnp.int32),
        num_seqs=jnp.asarray([2], jnp.int32),
    )
    q = jnp.asarray(rng.standard_normal((8, 4, head_dim)), jnp.float32)  # [T, N, H]
    new_kv = jnp.asarray(rng.standard_normal((8, 2 * num_kv_heads, head_dim)), jnp.float32)

    @functools.partial(jax.jit, static_argnames="backend")
    def step(kv_cache, layer, backend):
        return write_and_attend(
            q, new_kv, kv_cache, layer, metadata, sm_scale=0.125, backend=backend
        )

    layer = jnp.int32(1)
    want_cache, want = step(kv_cache, layer, "reference")
    got_cache, got = step(kv_cache, layer, backend)  # kernels run interpreted on a CPU host
    np.testing.assert_array_equal(np.asarray(got_cache), np.asarray(want_cache))
    np.testing.assert_allclose(np.asarray(got[:6]), np.asarray(want[:6]), atol=2e-5, rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(got[6:]), 0.0)
    assert not np.isnan(np.asarray(got)).any()


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "1, 2, 3, 4, 5,",
]


@pytest.mark.slow
@pytest.mark.parametrize("mode", modes("gpu"))
def test_smollm2_greedy_tokens_with_gpu_kernel_equal_reference(mode, smollm2):
    # The bundled model (G = 3, H = 64) generates the same greedy tokens through the GPU
    # kernel as through the reference, prefill and paged decode, all prompts batched.
    if mode == "interpret" and jax.default_backend() != "cpu":
        pytest.skip("interpret mode is the CPU-host variant; 'device' covers this platform")
    from flax import nnx

    from xlaserve.models.generate import greedy_generate

    prompts = [smollm2.tokenizer(p)["input_ids"] for p in PROMPTS]
    eos = smollm2.config.eos_token_ids
    new_tokens = 8 if mode == "interpret" else 32

    def generate(backend: str) -> list[list[int]]:
        model = nnx.merge(*nnx.split(smollm2.model))  # same weights, own static attributes
        model.attention_backend = backend
        return greedy_generate(model, prompts, new_tokens, stop_token_ids=eos)

    assert generate("gpu") == generate("reference")
