"""One entry point from a model name or path to a ready Flax model and its tokenizer."""

from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from transformers import PreTrainedTokenizerBase

from xlaserve.checkpoints import compressed_tensors, hf, orbax_store
from xlaserve.checkpoints.presets import resolve_bundled
from xlaserve.checkpoints.tokenizer import load_tokenizer
from xlaserve.kernels_cpu import skinny as skinny_kernel
from xlaserve.kernels_cpu.build import cpu_flags
from xlaserve.models.attention import resolve_backend
from xlaserve.models.hf_params import expected_hf_tensors, model_from_params, params_from_hf_tensors
from xlaserve.models.registry import preset_config, resolve_architecture
from xlaserve.models.transformer import Transformer, TransformerConfig
from xlaserve.multimodal.loader import is_multimodal, split_tensors
from xlaserve.quantization.config import GGUF_METHODS
from xlaserve.sharding.mesh import expert_parallel
from xlaserve.sharding.rules import check_mesh, init_sharded, placer

LOAD_FORMATS = ("auto", "hf", "gguf", "orbax", "dummy")
# Weight layouts: "stacked" (one [L, ...] array per parameter, layers run in a lax.scan) or
# "per_layer" (buffers of their own per layer, q/k/v and gate/up fused; see
# Transformer.unstack_layers: the CPU engine's layout).
LAYER_LAYOUTS = ("stacked", "per_layer")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Buffers some checkpoints carry that are derived from the config, not parameters.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class LoadedModel:
    model: Transformer
    config: TransformerConfig
    tokenizer: PreTrainedTokenizerBase | None
    source: str
    dtype: jnp.dtype
    vision: object | None = None  # a vision-language model's VisionParts (multimodal/loader)
    # A compressed-tensors checkpoint's scheme and stored projections, which load_model puts
    # in place of the dequantized ones (checkpoints/compressed_tensors.py).
    prequantized: tuple | None = None


def resolve_dtype(dtype: str, platform: str | None = None) -> jnp.dtype:
    """`auto` is bfloat16 on TPU and GPU; on the CPU it is bfloat16 where the CPU has bfloat16
    dot-product instructions (`cpu_has_bf16_dot`) or the engine's CPU matmul kernel runs
    (xlaserve/kernels_cpu, AVX2 and up), and float32 elsewhere.

    Measured on a 2-core AVX2 CPU without bfloat16 instructions (Zen 3, SmolLM2-135M, one
    sequence): bfloat16 weights on the kernel decode in 28 ms per token, float32 weights on
    XLA's matmuls in 88 ms.

    Measured on a 2-core AVX512_BF16 CPU (SmolLM2-135M, 32 prompts x 64 tokens): bfloat16
    weights decode 1.35x faster than float32 and agree with transformers' float32 greedy tokens
    on 29 of 32 prompts (transformers' own bfloat16: 22 of 32). The CPU engine keeps the KV
    cache in float32 and accumulates matmuls in float32 either way.
    """
    if dtype == "auto":
        platform = platform or jax.default_backend()
        if platform != "cpu" or cpu_has_bf16_dot() or skinny_kernel.available():
            return jnp.bfloat16
        return jnp.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


# x86 AVX512_BF16 / AMX-BF16, Arm BF16 (as /proc/cpuinfo names them).
BF16_DOT_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_has_bf16_dot(cpuinfo: str | None = None) -> bool:
    """Whether the CPU (described by /proc/cpuinfo text) has bfloat16 dot-product instructions.
    Without them XLA emulates bfloat16 matmuls, slower than float32."""
    return bool(BF16_DOT_FLAGS & cpu_flags(cpuinfo))


def detect_format(path: Path) -> str:
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if orbax_store.is_orbax_folder(path):
        return "orbax"
    if hf.is_hf_folder(path):
        return "hf"
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf"
        raise ValueError(
            f"cannot tell the format of {path}: expected config.json, an xlaserve orbax "
            f"folder or exactly one .gguf file (found {len(ggufs)})"
        )
    raise FileNotFoundError(f"model not found: {path} (not a bundled model name, file or folder)")


def check_tensors(
    expected: dict[str, tuple[int, ...]], tensors: dict[str, np.ndarray], source: str
) -> None:
    """Every expected tensor present with its shape, and nothing unaccounted for."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{source}: missing tensor(s) {missing[:8]} (of {len(missing)} missing)")
    unexpected = sorted(n for n in set(tensors) - set(expected) if not n.endswith(IGNORED_SUFFIXES))
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor(s) {unexpected[:8]}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(
                f"{source}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                f"expected {shape}"
            )


def drop_tied_head(config: TransformerConfig, tensors: dict[str, np.ndarray], source: str):
    # Some tied checkpoints still store lm_head; accept it only if it is the embedding.
    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        head = tensors.pop("lm_head.weight")
        embed = tensors.get("model.embed_tokens.weight")
        if embed is None or head.shape != embed.shape or not np.array_equal(head, embed):
            raise ValueError(
                f"{source}: config ties word embeddings but lm_head.weight differs from "
                "model.embed_tokens.weight"
            )


def model_from_hf_tensors(
    hf_config: dict, tensors: dict[str, np.ndarray], dtype, source: str, mesh=None
) -> tuple[Transformer, TransformerConfig]:
    model_cls, config = resolve_architecture(hf_config)
    drop_tied_head(config, tensors, source)
    check_tensors(expected_hf_tensors(config), tensors, source)
    top, layers = params_from_hf_tensors(config, tensors)
    place = None
    if mesh is not None:
        check_mesh(config, mesh)
        place = placer(config, mesh)
    return model_from_params(model_cls, config, top, layers, dtype, place), config


def load_model(
    model: str,
    *,
    load_format: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
    with_tokenizer: bool = True,
    mesh: Mesh | None = None,
    attention_backend: str = "auto",
    layer_layout: str = "stacked",
    quantization: str | None = None,
) -> LoadedModel:
    """Loads a bundled model name, an HF folder, a GGUF file, an orbax folder or a dummy preset,
    in its final form: the attention backend and the weight layout (`LAYER_LAYOUTS`) are fixed
    here and nothing changes the model afterwards.

    With a mesh, every parameter goes straight into its shards (see sharding/rules.py).
    quantization: one of xlaserve.quantization.QUANTIZATION_METHODS, applied to the decoder's
    projections before the layout is fixed.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
    if layer_layout not in LAYER_LAYOUTS:
        raise ValueError(f"layer_layout {layer_layout!r} is not one of {LAYER_LAYOUTS}")
    resolve_backend(attention_backend)  # a ValueError naming the choices, before loading
    if layer_layout == "per_layer" and mesh is not None:
        raise ValueError("layer_layout 'per_layer' is for one device (fused axes are unsharded)")
    if quantization in GGUF_METHODS and _format_of(model, load_format) != "gguf":
        raise ValueError(f"quantization {quantization!r} keeps a GGUF file's blocks packed; model "
                         f"{model!r} is not a .gguf file (use int8, w8a8 or fp8)")  # fmt: skip
    loaded = _load(model, load_format, dtype, seed, with_tokenizer, mesh)
    loaded.model.attention_backend = attention_backend
    if mesh is not None and expert_parallel(mesh) > 1:
        loaded.model.expert_mesh = mesh  # the MoE blocks run their experts per device
    if loaded.prequantized is not None:
        from xlaserve.quantization.model import load_prequantized

        scheme, stored = loaded.prequantized
        if quantization not in (None, scheme.method):
            raise ValueError(f"{loaded.source} is pre-quantized for {scheme.method!r} "
                             f"(compressed-tensors {scheme.format}); quantization="
                             f"{quantization!r} cannot apply to it (leave it unset)")  # fmt: skip
        load_prequantized(loaded.model, scheme.method, stored, mesh=mesh, source=loaded.source)
        loaded.prequantized = None  # the stored arrays now live in the model
    elif quantization is not None:
        from xlaserve.quantization.model import quantize_model

        quantize_model(loaded.model, quantization, mesh=mesh, source=loaded.source)
    if layer_layout == "per_layer":
        loaded.model.unstack_layers()
    return loaded


def _format_of(model: str, load_format: str) -> str:
    if load_format != "auto":
        return load_format
    return detect_format(resolve_bundled(model) or Path(model))


def _load(model: str, load_format: str, dtype: str, seed: int, with_tokenizer: bool, mesh):
    jdtype = resolve_dtype(dtype)
    if load_format == "dummy":
        model_cls, config = preset_config(model)
        if mesh is None:
            module = model_cls(config, dtype=jdtype, rngs=nnx.Rngs(seed))
        else:
            check_mesh(config, mesh)
            module = init_sharded(model_cls, config, dtype=jdtype, seed=seed, mesh=mesh)
        return LoadedModel(module, config, None, model, jdtype)

    path = resolve_bundled(model) or Path(model)
    fmt = detect_format(path) if load_format == "auto" else load_format
    if fmt == "orbax":
        module, config = orbax_store.restore(path, dtype=jdtype, mesh=mesh)
        tokenizer = orbax_store.load_tokenizer(path) if with_tokenizer else None
        return LoadedModel(module, config, tokenizer, str(path), jdtype)
    if fmt == "gguf":
        from xlaserve.checkpoints.gguf import read_gguf

        gguf_path = path if path.is_file() else sorted(path.glob("*.gguf"))[0]
        ckpt = read_gguf(gguf_path)
        module, config = model_from_hf_tensors(
            ckpt.config, ckpt.tensors, jdtype, str(gguf_path), mesh
        )
        tokenizer = load_tokenizer(gguf_path) if with_tokenizer else None
        if tokenizer is not None and not tokenizer.chat_template:
            tokenizer.chat_template = family_chat_template(config)
        return LoadedModel(module, config, tokenizer, str(gguf_path), jdtype)
    if not hf.is_hf_folder(path):
        raise FileNotFoundError(f"no config.json in {path}")
    hf_config = hf.read_config(path)
    scheme = compressed_tensors.read_scheme(hf_config, str(path))
    if scheme is not None and is_multimodal(hf_config):
        raise ValueError(f"{path}: pre-quantized vision-language checkpoints are not served")
    if is_multimodal(hf_config):  # a decoder plus a vision tower (xlaserve/multimodal)
        text_config, tensors, vision = split_tensors(
            hf_config, hf.read_tensors(path), path, check_tensors
        )
        module, config = model_from_hf_tensors(text_config, tensors, jdtype, str(path), mesh)
        tokenizer = load_tokenizer(path) if with_tokenizer and has_tokenizer_files(path) else None
        return LoadedModel(module, config, tokenizer, str(path), jdtype, vision)
    model_cls, _ = resolve_architecture(hf_config)  # fail on the architecture before reading
    tensors = hf.read_tensors(path)
    stored = None
    if scheme is not None:  # the model is built dequantized; load_model puts these back
        stored = compressed_tensors.take_quantized(tensors, scheme, str(path))
    module, config = model_from_hf_tensors(hf_config, tensors, jdtype, str(path), mesh)
    tokenizer = load_tokenizer(path) if with_tokenizer and has_tokenizer_files(path) else None
    prequantized = None if scheme is None else (scheme, stored)
    return LoadedModel(module, config, tokenizer, str(path), jdtype, None, prequantized)


def family_chat_template(config: TransformerConfig) -> str | None:
    """The chat format a family defines, for checkpoints that carry no template of their own."""
    from xlaserve.models import gemma

    return gemma.CHAT_TEMPLATE if config.architecture in gemma.ARCHITECTURES else None


def has_tokenizer_files(folder: Path) -> bool:
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    return any((folder / n).is_file() for n in names)
