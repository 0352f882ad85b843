"""Converted parameters stored with orbax, so later loads skip parsing and dequantization.

Folder layout: `xlaserve_model.json` (config, dtype, source), `params/` (orbax checkpoint of
{"top": {...}, "layers": {...}}), `tokenizer/` (HF tokenizer files).
"""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from transformers import PreTrainedTokenizerBase

from xlaserve.models.hf_params import model_from_params
from xlaserve.models.layers import RopeScaling
from xlaserve.models.registry import MODEL_REGISTRY
from xlaserve.models.transformer import Transformer, TransformerConfig
from xlaserve.sharding.rules import check_mesh, mesh_rules, placer, spec_for

MARKER = "xlaserve_model.json"
FORMAT_VERSION = 1


def is_orbax_folder(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).is_file()


def config_to_json(config: TransformerConfig) -> dict:
    return dataclasses.asdict(config)


def config_from_json(data: dict) -> TransformerConfig:
    return TransformerConfig(
        **{
            **data,
            "rope_scaling": RopeScaling(**data["rope_scaling"]),
            "eos_token_ids": tuple(data["eos_token_ids"]),
            "layer_types": tuple(data.get("layer_types", ())),
            "mrope_section": tuple(data.get("mrope_section", ())),
        }
    )


def param_tree(model: Transformer, dtype) -> dict:
    top = {name: getattr(model, name)[...].astype(dtype) for name in top_names(model)}
    layers = {name: arr.astype(dtype) for name, arr in model.layers.values().items()}
    return {"top": top, "layers": layers}


def top_names(model: Transformer) -> tuple[str, ...]:
    names = ("embed", "final_norm")
    return names if model.config.tie_word_embeddings else (*names, "lm_head")


def save(
    model: Transformer,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | Path,
    *,
    dtype,
    source: str,
) -> Path:
    out = check_out_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "params", param_tree(model, dtype))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out / "tokenizer"))
    meta = {
        "format_version": FORMAT_VERSION,
        "config": config_to_json(model.config),
        "dtype": jnp.dtype(dtype).name,
        "source": source,
    }
    (out / MARKER).write_text(json.dumps(meta, indent=2))
    return out


def check_out_dir(out_dir: str | Path) -> Path:
    """The absolute output folder; FileExistsError if it exists and is not empty."""
    out = Path(out_dir).absolute()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder is not empty: {out}")
    return out


def read_meta(path: str | Path) -> dict:
    """The folder's xlaserve_model.json (config, dtype, source), its format version checked."""
    path = Path(path).absolute()
    try:
        meta = json.loads((path / MARKER).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupt xlaserve orbax folder {path}: {e}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format_version {meta.get('format_version')}")
    return meta


def restore(path: str | Path, *, dtype, mesh=None) -> tuple[Transformer, TransformerConfig]:
    """Restores the parameters; with a mesh, orbax reads each shard straight onto its device."""
    path = Path(path).absolute()
    meta = read_meta(path)
    config = config_from_json(meta["config"])
    model_cls, _ = MODEL_REGISTRY[config.architecture]
    stored = jnp.dtype(meta["dtype"])
    abstract_model = nnx.eval_shape(lambda: model_cls(config, dtype=stored, rngs=nnx.Rngs(0)))
    abstract = jax.eval_shape(
        lambda: param_tree(model_cls(config, dtype=stored, rngs=nnx.Rngs(0)), stored)
    )
    place = None
    if mesh is not None:
        check_mesh(config, mesh)
        rules = mesh_rules(config, mesh)
        axes = param_axes(abstract_model)
        abstract = {
            group: {
                name: jax.ShapeDtypeStruct(
                    x.shape,
                    x.dtype,
                    sharding=NamedSharding(mesh, spec_for(axes[group][name], rules)),
                )
                for name, x in tree.items()
            }
            for group, tree in abstract.items()
        }
        place = placer(config, mesh)
    if not (path / "params").is_dir():
        raise FileNotFoundError(f"orbax parameters missing: {path / 'params'}")
    tree = restore_tree(path / "params", abstract, sharded=mesh is not None)
    model = model_from_params(model_cls, config, tree["top"], tree["layers"], dtype, place)
    return model, config


def restore_tree(params_dir: Path, abstract: dict, *, sharded: bool) -> dict:
    """Sharded: jax Arrays in the abstract tree's shardings (each shard read onto its device).
    Otherwise numpy arrays, so that the parameters end up uncommitted on the default device,
    exactly like those of the HF and GGUF paths. Restoring them as jax Arrays would commit them
    to the device recorded at save time; jit outputs computed from committed parameters are
    committed too (the KV cache, the penalty state), and a graph warmed up while those were
    still uncommitted is lowered again on its first real step."""
    if sharded:
        with ocp.StandardCheckpointer() as ckptr:
            return ckptr.restore(params_dir, abstract)
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(
            params_dir, args=ocp.args.PyTreeRestore(item=abstract, restore_args=as_numpy)
        )


def param_axes(model: Transformer) -> dict:
    def axes(owner, name):
        return getattr(owner, name).get_metadata()["logical_axes"]

    return {
        "top": {name: axes(model, name) for name in top_names(model)},
        "layers": {name: axes(model.layers, name) for name in model.layers.names},
    }


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase | None:
    from xlaserve.checkpoints.tokenizer import load_tokenizer as load

    folder = Path(path) / "tokenizer"
    return load(folder) if folder.is_dir() else None
