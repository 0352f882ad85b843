"""Logical axes of parameters and of the KV cache mapped to mesh axes.

Models only name logical axes (`vocab`, `embed`, `heads`, `kv_heads`, `mlp`, `layers`; see the
`logical_axes` metadata of each `nnx.Param`). Attention heads and MLP width are split over
`model` (column-parallel in, row-parallel out); the embedding and LM head are vocab-parallel.
KV heads are split over `model` when their count divides by the tensor-parallel size, and
replicated when there are fewer KV heads than devices (each device then holds every KV head).
"""

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from xlaserve.models.transformer import TransformerConfig
from xlaserve.sharding.mesh import EXPERT, MODEL, expert_parallel


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_tensor_parallel(config: TransformerConfig, tp: int) -> None:
    """Refuses a tensor-parallel size the model's head counts cannot be split by."""
    n, k = config.num_heads, config.num_kv_heads
    works = [t for t in divisors(n) if k % t == 0 or t % k == 0]
    if tp not in works:
        raise ValueError(
            f"tensor_parallel_size {tp} does not fit num_attention_heads {n} and "
            f"num_key_value_heads {k} (query heads must split evenly; KV heads must split "
            f"evenly or be fewer than the devices); sizes that work: {works}"
        )
    if config.intermediate_size % tp:
        raise ValueError(
            f"tensor_parallel_size {tp} does not divide intermediate_size "
            f"{config.intermediate_size}"
        )


def check_expert_parallel(config: TransformerConfig, ep: int) -> None:
    """Refuses an expert-parallel size the model's experts cannot be split by."""
    if ep == 1:
        return
    if not config.num_experts:
        raise ValueError(
            f"expert_parallel_size {ep} needs a mixture-of-experts model; "
            f"{config.architecture} has no experts"
        )
    if config.num_experts % ep:
        raise ValueError(
            f"expert_parallel_size {ep} does not divide the {config.num_experts} experts"
        )


def check_mesh(config: TransformerConfig, mesh) -> None:
    """check_tensor_parallel and check_expert_parallel for a mesh's sizes."""
    tp = mesh.shape[MODEL]
    check_tensor_parallel(config, tp)
    check_expert_parallel(config, expert_parallel(mesh))
    if config.num_experts and config.moe_intermediate_size % tp:
        raise ValueError(
            f"tensor_parallel_size {tp} does not divide moe_intermediate_size "
            f"{config.moe_intermediate_size}"
        )


def mesh_rules(config: TransformerConfig, mesh) -> dict[str, str | None]:
    """logical_rules for a mesh's tensor- and expert-parallel sizes."""
    return logical_rules(config, mesh.shape[MODEL], expert_parallel(mesh))


def logical_rules(config: TransformerConfig, tp: int, ep: int = 1) -> dict[str, str | None]:
    """logical axis -> mesh axis (None = replicated) for this model and tensor-parallel size
    (and expert-parallel size: experts split over the expert axis)."""
    return {
        "vocab": MODEL if config.vocab_size % tp == 0 else None,
        "embed": None,
        "heads": MODEL,
        "kv_heads": MODEL if config.num_kv_heads % tp == 0 else None,
        "mlp": MODEL,
        "layers": None,
        "expert": EXPERT if ep > 1 else None,  # each expert's mlp axis is split over model
        None: None,
    }


def spec_for(axes: tuple, rules: dict) -> P:
    return P(*(rules[a] for a in axes))


def param_shardings(model: nnx.Module, mesh: Mesh) -> nnx.State:
    """A State of NamedShardings mirroring the model's parameters."""
    rules = mesh_rules(model.config, mesh)
    state = nnx.state(model, nnx.Param)
    return jax.tree.map(
        lambda v: NamedSharding(mesh, spec_for(v.get_metadata()["logical_axes"], rules)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def kv_cache_sharding(config: TransformerConfig, mesh: Mesh) -> NamedSharding:
    """KV cache [L, P, page_size, 2K, H]: the interleaved K/V axis follows the KV heads, so a
    device's slice holds whole (k, v) pairs of its heads."""
    rules = logical_rules(config, mesh.shape[MODEL])
    return NamedSharding(mesh, P(None, None, None, rules["kv_heads"], None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def placer(config: TransformerConfig, mesh: Mesh):
    """place(variable, host_array): device_put straight into the parameter's shards (each
    device receives only its slice; no full copy lands on one device first)."""
    rules = mesh_rules(config, mesh)

    def place(variable: nnx.Variable, host):
        sharding = NamedSharding(mesh, spec_for(variable.get_metadata()["logical_axes"], rules))
        if isinstance(host, jax.Array):
            return jax.device_put(host, sharding)
        # Each addressable device copies its own slice (also when the mesh spans processes).
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return place


def init_sharded(model_cls, config: TransformerConfig, *, dtype, seed: int, mesh: Mesh):
    """Random-weight model whose parameters are created directly in their shards."""
    abstract = nnx.eval_shape(lambda: model_cls(config, dtype=dtype, rngs=nnx.Rngs(seed)))
    graphdef, _ = nnx.split(abstract)
    shardings = param_shardings(abstract, mesh)

    @jax.jit
    def init():
        return nnx.state(model_cls(config, dtype=dtype, rngs=nnx.Rngs(seed)), nnx.Param)

    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)
