"""A decoder `Transformer` from HF checkpoint tensors: the tensors a config expects (names and
HF shapes), their conversion to our stacked parameters, and the model built around given
parameters without a random init."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xlaserve.models.transformer import (
    NORM_PARAMS,
    Transformer,
    TransformerConfig,
    layer_param_specs,
    top_param_specs,
)


def expected_hf_tensors(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of this config must hold, with its HF shape."""
    expected = {
        hf: hf_shape(name, shape) for name, (hf, shape, _) in top_param_specs(config).items()
    }
    for name, (hf, shape, _) in layer_param_specs(config).items():
        for i in range(config.num_layers):
            if "{e}" in hf:  # one HF tensor per expert (models/moe.py)
                for e in range(shape[0]):
                    expected[f"model.layers.{i}.{hf.format(e=e)}"] = hf_shape(name, shape[1:])
            else:
                expected[f"model.layers.{i}.{hf}"] = hf_shape(name, shape)
    return expected


def hf_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    # Our matrices are [in, out]; HF Linear is [out, in]. The embedding is [V, D] in both.
    return shape[::-1] if len(shape) == 2 and name != "embed" else shape


def params_from_hf_tensors(
    config: TransformerConfig, tensors: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(top-level params, stacked layer params) as numpy, from already-validated HF tensors."""

    def ours(name: str, array: np.ndarray) -> np.ndarray:
        return array.T if array.ndim == 2 and name != "embed" else array

    def layer_tensor(name: str, hf: str, shape: tuple[int, ...], i: int) -> np.ndarray:
        if "{e}" in hf:  # experts stacked along a leading E axis
            prefix = f"model.layers.{i}."
            return np.stack([ours(name, tensors[prefix + hf.format(e=e)]) for e in range(shape[0])])
        return ours(name, tensors[f"model.layers.{i}.{hf}"])

    top = {name: ours(name, tensors[hf]) for name, (hf, _, _) in top_param_specs(config).items()}
    layers = {
        name: np.stack([layer_tensor(name, hf, shape, i) for i in range(config.num_layers)])
        for name, (hf, shape, _) in layer_param_specs(config).items()
    }
    if config.norm_weight_offset:  # Gemma's (1 + w) folded into the stored weight
        for params in (top, layers):
            for name in set(params) & set(NORM_PARAMS):
                params[name] = params[name] + np.asarray(config.norm_weight_offset, np.float32)
    return top, layers


def model_from_params(
    model_cls: type[Transformer],
    config: TransformerConfig,
    top: dict[str, np.ndarray | jax.Array],
    layers: dict[str, np.ndarray | jax.Array],
    dtype,
    place=None,
) -> Transformer:
    """A model holding the given parameters, built without materializing a random init.

    place(variable, host_array) -> device array puts each parameter where it belongs (e.g.
    straight into its shards); by default everything goes to the default device.
    """
    model = nnx.eval_shape(lambda: model_cls(config, dtype=dtype, rngs=nnx.Rngs(0)))
    jdtype = jnp.dtype(dtype)
    for owner, values in ((model, top), (model.layers, layers)):
        for name, value in values.items():
            variable = getattr(owner, name)
            if place is None:
                variable.set_value(jnp.asarray(value, dtype=jdtype))
            else:
                host = value if isinstance(value, jax.Array) else np.asarray(value).astype(jdtype)
                variable.set_value(place(variable, host).astype(jdtype))
    return model
