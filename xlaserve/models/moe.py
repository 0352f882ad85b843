"""Mixture-of-experts feed-forward blocks (Mixtral, Qwen3-MoE) for the shared decoder.

A router scores every token against E experts (softmax over E), keeps the top k (optionally
renormalised to sum to 1, `norm_topk_prob`) and the block returns the weighted sum of those
experts' SwiGLU outputs. The computation is dropless: every routed (token, expert) pair is
computed, none is dropped for capacity.

`grouped_experts` sorts the T*k pairs by expert and runs each projection as one grouped matmul
(`jax.lax.ragged_dot`: rows of group g multiply expert g's matrix); `dense_experts` is the
reference beside it, every expert over every token, masked by the routing weights.
Axis letters: T tokens, D model, E experts, F expert mlp dim, A = T*k routed pairs.
"""

import jax
import jax.numpy as jnp

from xlaserve.models.layers import linear

MIXTRAL = "MixtralForCausalLM"
QWEN3_MOE = "Qwen3MoeForCausalLM"
ARCHITECTURES = (MIXTRAL, QWEN3_MOE)

# Per-family HF names (under model.layers.{i}.) of the router and of expert e's projections.
HF_NAMES = {
    MIXTRAL: dict(
        router="block_sparse_moe.gate.weight",
        gate="block_sparse_moe.experts.{e}.w1.weight",
        up="block_sparse_moe.experts.{e}.w3.weight",
        down="block_sparse_moe.experts.{e}.w2.weight",
    ),
    QWEN3_MOE: dict(
        router="mlp.gate.weight",
        gate="mlp.experts.{e}.gate_proj.weight",
        up="mlp.experts.{e}.up_proj.weight",
        down="mlp.experts.{e}.down_proj.weight",
    ),
}
EXPERT_PARAMS = ("we_gate", "we_up", "we_down")


def moe_param_specs(c) -> dict[str, tuple[str, tuple[int, ...], tuple]]:
    """Router [D, E] and stacked expert weights [E, D, F] / [E, F, D] (ours are [in, out]);
    an expert's HF name holds `{e}`, filled in per expert by the loader."""
    D, E, F = c.hidden_size, c.num_experts, c.moe_intermediate_size
    names = HF_NAMES[c.architecture]
    return {
        "w_router": (names["router"], (D, E), ("embed", None)),
        "we_gate": (names["gate"], (E, D, F), ("expert", "embed", "mlp")),
        "we_up": (names["up"], (E, D, F), ("expert", "embed", "mlp")),
        "we_down": (names["down"], (E, F, D), ("expert", "mlp", "embed")),
    }


def route(h: jax.Array, w_router: jax.Array, c) -> tuple[jax.Array, jax.Array]:
    """(weights [T, k] in h's dtype, expert ids i32[T, k]) for normed hidden states h [T, D]."""
    logits = linear(h, w_router).astype(jnp.float32)  # [T, E]
    probs = jax.nn.softmax(logits, axis=-1)
    weights, experts = jax.lax.top_k(probs, c.num_experts_per_tok)  # [T, k]
    if c.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(h.dtype), experts.astype(jnp.int32)


def grouped_experts(
    h: jax.Array, weights: jax.Array, experts: jax.Array, p: dict[str, jax.Array]
) -> jax.Array:
    """Dropless experts by grouped matmuls over the (token, expert) pairs sorted by expert."""
    num_tokens, k = experts.shape
    num_experts = p["we_gate"].shape[0]
    flat = experts.reshape(-1)  # [A]; id E: an expert held elsewhere (expert parallel)
    order = jnp.argsort(flat, stable=True)  # pairs grouped by expert, elsewhere ones last
    token = order // k  # [A] the token of each sorted pair
    group_sizes = jnp.bincount(flat, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    x = h[token]  # [A, D]

    def matmul(lhs, rhs):
        out = jax.lax.ragged_dot(
            lhs.astype(rhs.dtype), rhs, group_sizes, preferred_element_type=jnp.float32
        )
        return out.astype(h.dtype)

    act = jax.nn.silu(matmul(x, p["we_gate"])) * matmul(x, p["we_up"])  # [A, F]
    y = matmul(act, p["we_down"])  # [A, D]
    here = (flat[order] < num_experts)[:, None]  # rows in no group are left out
    y = jnp.where(here, y * weights.reshape(-1)[order][:, None], 0)
    return jnp.zeros_like(h).at[token].add(y)  # [T, D]


def dense_experts(
    h: jax.Array, weights: jax.Array, experts: jax.Array, p: dict[str, jax.Array]
) -> jax.Array:
    """The reference: every expert over every token, each output weighted by that token's
    routing weight for the expert (0 where it was not chosen)."""
    out = jnp.zeros(h.shape, jnp.float32)
    for e in range(p["we_gate"].shape[0]):
        gate = jax.nn.silu(linear(h, p["we_gate"][e])) * linear(h, p["we_up"][e])  # [T, F]
        y = linear(gate, p["we_down"][e])  # [T, D]
        w = jnp.sum(jnp.where(experts == e, weights, 0), axis=-1)  # [T]
        out = out + (w[:, None] * y).astype(jnp.float32)
    return out.astype(h.dtype)


MOE_IMPLS = ("grouped", "dense")


def default_impl(platform: str | None = None) -> str:
    """ "grouped" on accelerators; "dense" on the CPU, where XLA lowers ragged_dot to one
    masked matmul over all E experts' weights (E times the work, plus a copy of every
    expert's weights per call): the dense loop is faster there (measured 3-6x at 32 and 256
    tokens, benchmarks/results/moe-layer-*)."""
    platform = platform or jax.default_backend()
    return "dense" if platform == "cpu" else "grouped"


def moe_block(
    h: jax.Array, p: dict[str, jax.Array], c, impl: str | None = None, mesh=None
) -> jax.Array:
    """The MoE feed-forward output [T, D] of normed hidden states h [T, D]; impl is one of
    MOE_IMPLS (None: `default_impl` for this platform). With a mesh that has an expert axis,
    each device runs its own experts (see `expert_parallel_experts`)."""
    impl = impl or default_impl()
    if impl not in MOE_IMPLS:
        raise ValueError(f"MoE impl {impl!r} is not one of {MOE_IMPLS}")
    weights, experts = route(h, p["w_router"], c)
    run = dense_experts if impl == "dense" else grouped_experts
    if mesh is not None:
        return expert_parallel_experts(run, h, weights, experts, p, mesh)
    return run(h, weights, experts, p)


def expert_parallel_experts(run, h, weights, experts, p, mesh) -> jax.Array:
    """Experts split over the mesh's expert axis (and each expert's F axis over the model
    axis): every device sees all tokens (activations are replicated between layers), runs
    only the pairs routed to its own experts, and one all-reduce over both axes sums the
    partial outputs. No token is dropped; the exchange is the one [T, D] all-reduce the
    tensor-parallel MLP needs anyway."""
    from jax.sharding import PartitionSpec as P

    from xlaserve.sharding.mesh import EXPERT, MODEL

    experts_here = p["we_gate"].shape[0] // mesh.shape[EXPERT]

    def local(h, weights, experts, we_gate, we_up, we_down):
        first = jax.lax.axis_index(EXPERT) * experts_here
        mine = (experts >= first) & (experts < first + experts_here)  # [T, k]
        local_ids = jnp.where(mine, experts - first, experts_here)  # elsewhere -> E_local
        local_weights = jnp.where(mine, weights, 0)
        params = {"we_gate": we_gate, "we_up": we_up, "we_down": we_down}
        out = run(h, local_weights, local_ids, params).astype(jnp.float32)
        return jax.lax.psum(out, (EXPERT, MODEL)).astype(h.dtype)

    expert_in, expert_out = P(EXPERT, None, MODEL), P(EXPERT, MODEL, None)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(), P(), expert_in, expert_in, expert_out),
        out_specs=P(),
        check_vma=False,
    )(h, weights, experts, p["we_gate"], p["we_up"], p["we_down"])


def moe_config(base, hf: dict):
    """The MoE fields of an HF Mixtral / Qwen3-MoE config added to `base` (its dense config)."""
    import dataclasses

    arch = hf["architectures"][0]
    num_experts = hf.get("num_local_experts") or hf.get("num_experts")
    if arch == QWEN3_MOE:
        if hf.get("mlp_only_layers"):
            raise ValueError(
                f"mlp_only_layers={hf['mlp_only_layers']} (dense layers among MoE layers) is "
                "not supported"
            )
        if hf.get("decoder_sparse_step", 1) != 1:
            raise ValueError(f"decoder_sparse_step={hf['decoder_sparse_step']} is not supported")
        moe_size = hf["moe_intermediate_size"]
        norm_topk = bool(hf.get("norm_topk_prob", False))
    else:  # Mixtral always renormalises the top k
        moe_size, norm_topk = hf["intermediate_size"], True
    if hf.get("shared_expert_intermediate_size"):
        raise ValueError("shared experts are not supported for this architecture")
    return dataclasses.replace(
        base,
        num_experts=int(num_experts),
        num_experts_per_tok=int(hf["num_experts_per_tok"]),
        moe_intermediate_size=int(moe_size),
        norm_topk_prob=norm_topk,
    )


PRESETS = {
    "mixtral-8x7b": (MIXTRAL, dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=1000000.0,
        max_position_embeddings=32768, eos_token_ids=(2,), bos_token_id=1,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=14336,
    )),
    "qwen3-30b-a3b": (QWEN3_MOE, dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_layers=48,
        num_heads=32, num_kv_heads=4, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=40960, qk_norm=True, eos_token_ids=(151645, 151643),
        bos_token_id=151643, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
    )),
}  # fmt: skip
