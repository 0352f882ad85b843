"""The device half of multi-LoRA: static adapter-slot buffers and the jitted slot write.

Per target module, A [L, I, S, R] and B [L, S, R, O] with S = max_loras stored slots (token
slot s >= 1 reads stored slot s - 1; slot 0, no adapter, is not stored) and R = max_lora_rank;
the per-layer (CPU) layout keeps one dict per layer without the L axis, like the base weights.
Writing an adapter into a slot is one jitted update with the buffers donated (in place),
compiled once at warm-up for every slot: loading, evicting and mixing adapters never compiles.

Under tensor parallelism the buffers are sharded like the base weights they attach to: for a
column-parallel weight (q/k/v/gate/up, output axis split) B is split on O; for a row-parallel
weight (o/down, input axis split) A is split on I. The shrink of a row-parallel module then
sums partial products over devices, as the base matmul does.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from xlaserve.lora.adapter import LoRAAdapter, module_shapes
from xlaserve.models.transformer import TransformerConfig, layer_param_specs
from xlaserve.sharding import rules
from xlaserve.sharding.mesh import MODEL


def buffer_shapes(config: TransformerConfig, max_loras: int, max_rank: int) -> dict:
    S, R, L = max_loras, max_rank, config.num_layers
    return {name: {"a": (L, i, S, R), "b": (L, S, R, o)}
            for name, (i, o) in module_shapes(config).items()}  # fmt: skip


def buffer_shardings(config: TransformerConfig, mesh: Mesh) -> dict:
    """NamedShardings of the stacked buffers, following each base weight's logical axes."""
    logical = rules.logical_rules(config, mesh.shape[MODEL])
    specs = layer_param_specs(config)
    out = {}
    for name in module_shapes(config):
        in_axis, out_axis = specs[name][2]
        out[name] = {
            "a": NamedSharding(mesh, rules.spec_for(("layers", in_axis, None, None), logical)),
            "b": NamedSharding(mesh, rules.spec_for(("layers", None, None, out_axis), logical)),
        }
    return out


def value_shardings(config: TransformerConfig, mesh: Mesh) -> dict:
    """NamedShardings of one slot's contents (A [L, I, R], B [L, R, O]), split like the
    buffers, so an adapter goes from the host straight into each device's shard."""
    logical = rules.logical_rules(config, mesh.shape[MODEL])
    specs = layer_param_specs(config)
    out = {}
    for name in module_shapes(config):
        in_axis, out_axis = specs[name][2]
        out[name] = {
            "a": NamedSharding(mesh, rules.spec_for(("layers", in_axis, None), logical)),
            "b": NamedSharding(mesh, rules.spec_for(("layers", None, out_axis), logical)),
        }
    return out


def _write_stacked(buffers: dict, slot: jax.Array, values: dict) -> dict:
    return {
        name: {
            "a": buf["a"].at[:, :, slot, :].set(values[name]["a"].astype(buf["a"].dtype)),
            "b": buf["b"].at[:, slot].set(values[name]["b"].astype(buf["b"].dtype)),
        }
        for name, buf in buffers.items()
    }


def _write_per_layer(buffers: list, slot: jax.Array, values: dict) -> list:
    return [
        {
            name: {
                "a": buf["a"].at[:, slot, :].set(values[name]["a"][i].astype(buf["a"].dtype)),
                "b": buf["b"].at[slot].set(values[name]["b"][i].astype(buf["b"].dtype)),
            }
            for name, buf in layer.items()
        }
        for i, layer in enumerate(buffers)
    ]


class LoRASlots:
    """The adapter-slot buffers of one runner and the write that fills a slot."""

    def __init__(
        self,
        config: TransformerConfig,
        *,
        max_loras: int,
        max_rank: int,
        dtype,
        per_layer: bool,
        mesh: Mesh | None = None,
    ) -> None:
        self.config = config
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.per_layer = per_layer
        self._value_shardings = None if mesh is None else value_shardings(config, mesh)
        shapes = buffer_shapes(config, max_loras, max_rank)
        zeros = partial(jax.tree.map, lambda shape: jnp.zeros(shape, dtype))
        is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
        if per_layer:
            if mesh is not None:
                raise ValueError("the per-layer layout is for one device")
            layer = {n: {k: s[1:] for k, s in ab.items()} for n, ab in shapes.items()}
            make_layer = jax.jit(lambda: zeros(layer, is_leaf=is_shape))  # compiled once
            self.buffers = [make_layer() for _ in range(config.num_layers)]
            self._write = jax.jit(_write_per_layer, donate_argnums=(0,))
        elif mesh is None:
            self.buffers = jax.jit(lambda: zeros(shapes, is_leaf=is_shape))()
            self._write = jax.jit(_write_stacked, donate_argnums=(0,))
        else:
            shardings = buffer_shardings(config, mesh)
            self.buffers = jax.jit(
                lambda: zeros(shapes, is_leaf=is_shape), out_shardings=shardings
            )()
            self._write = jax.jit(_write_stacked, donate_argnums=(0,), out_shardings=shardings)
        self._shapes = shapes

    def host_values(self, adapter: LoRAAdapter | None) -> dict:
        """The slot contents for `adapter` as numpy ([L, I, R] and [L, R, O] per module);
        modules it does not adapt (and None) are zeros."""
        values = {}
        for name, ab in self._shapes.items():
            L, i, _, r = ab["a"]
            o = ab["b"][-1]
            pair = None if adapter is None else adapter.weights.get(name)
            if pair is None:
                values[name] = {"a": np.zeros((L, i, r), np.float32),
                                "b": np.zeros((L, r, o), np.float32)}  # fmt: skip
            else:
                values[name] = {"a": pair[0], "b": pair[1]}
        return values

    def write(self, slot: int, adapter: LoRAAdapter | None) -> None:
        """Puts `adapter` (None: zeros) into token slot `slot` (1..max_loras), in place."""
        if not 1 <= slot <= self.max_loras:
            raise ValueError(f"LoRA slot {slot} is not in [1, {self.max_loras}]")
        values = self.host_values(adapter)
        if self._value_shardings is not None:  # each device receives only its shard
            values = jax.tree.map(
                lambda x, sharding: jax.make_array_from_callback(
                    x.shape, sharding, lambda index: x[index]
                ),
                values,
                self._value_shardings,
            )
        self.buffers = self._write(self.buffers, np.int32(slot - 1), values)
