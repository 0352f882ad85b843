"""Ragged paged attention: one entry point over the reference, TPU and GPU implementations.

`reference.py` (plain jnp) is the truth; `tpu.py` (Mosaic) and `gpu.py` (Triton) are kernels
with the same contract; `tuning.py` holds their block sizes.
"""

import jax

from xlaserve.kernels_pallas.ragged_paged_attention import reference

IMPLS = ("auto", "reference", "tpu", "gpu")
# Platforms each kernel runs on; "cpu" means the interpreter (tests, debugging).
KERNEL_PLATFORMS = {"tpu": ("tpu", "cpu"), "gpu": ("gpu", "cpu")}


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """The implementation `impl` names on `platform` (default: jax.default_backend()).

    "auto" picks the TPU kernel on TPU, the GPU kernel on GPU and the reference elsewhere.
    Raises ValueError for an unknown name or a kernel that cannot run on the platform.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose from {IMPLS}")
    platform = platform or jax.default_backend()
    if impl == "auto":
        return platform if platform in KERNEL_PLATFORMS else "reference"
    if impl in KERNEL_PLATFORMS and platform not in KERNEL_PLATFORMS[impl]:
        raise ValueError(
            f"the {impl} attention kernel cannot run on platform {platform!r} "
            f"(runs on {KERNEL_PLATFORMS[impl]})"
        )
    return impl


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
    impl: str = "auto",
    interpret: bool = False,
    **block_sizes: int,
) -> jax.Array:
    """Causal attention of ragged query rows over paged K/V; contract in `reference.py`.

    q: [T, N, H]; kv_cache: [P, page_size, 2K, H]; kv_lens: i32[S];
    page_indices: i32[S, pages_per_seq]; cu_q_lens: i32[S + 1]; num_seqs: i32[1].
    Returns [T, N, H]. impl: "auto" | "reference" | "tpu" | "gpu" (see resolve_impl).
    interpret: run a kernel in its interpreter (CPU). block_sizes go to the kernel
    (tpu: block_q, block_kv_pages, block_kv_heads; gpu: block_rows, block_kv, kv_splits,
    num_warps, num_stages); unset ones come from tuning.py.
    """
    impl = resolve_impl(impl)
    args = (q, kv_cache, kv_lens, page_indices, cu_q_lens, num_seqs)
    options = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    if impl == "reference":
        if block_sizes:
            raise ValueError(f"the reference takes no block sizes, got {sorted(block_sizes)}")
        return reference.ragged_paged_attention(*args, **options)
    if impl == "tpu":
        from xlaserve.kernels_pallas.ragged_paged_attention import tpu

        return tpu.ragged_paged_attention(*args, **options, **block_sizes, interpret=interpret)
    from xlaserve.kernels_pallas.ragged_paged_attention import gpu

    return gpu.ragged_paged_attention(*args, **options, **block_sizes, interpret=interpret)


__all__ = ["IMPLS", "ragged_paged_attention", "resolve_impl"]
