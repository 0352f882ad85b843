"""Loads the torch model from the same sources, with the same strictness, as the JAX loader.

HF folders and GGUF files are read by `xlaserve.checkpoints` (`hf.read_tensors`, `read_gguf`)
and checked by the JAX loader's own `check_tensors` / `drop_tied_head` against
`expected_hf_tensors`: a missing, unexpected or mis-shaped tensor is the same error on both
backends. Sources that only exist as JAX parameters (orbax stores, `load_format="dummy"`
presets) are loaded by the JAX loader and converted, so both backends hold the same weights.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from xlaserve.checkpoints import compressed_tensors, hf
from xlaserve.checkpoints.loader import (
    LOAD_FORMATS,
    LoadedModel,
    check_tensors,
    detect_format,
    drop_tied_head,
    has_tokenizer_files,
    load_model,
)
from xlaserve.checkpoints.presets import resolve_bundled
from xlaserve.checkpoints.tokenizer import load_tokenizer
from xlaserve.kernels_cuda.attention import resolve_attention
from xlaserve.kernels_cuda.model import TorchTransformer
from xlaserve.models.hf_params import expected_hf_tensors
from xlaserve.models.registry import resolve_architecture
from xlaserve.models.transformer import TransformerConfig, layer_param_specs, top_param_specs

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TorchLoadedModel:
    model: TorchTransformer
    config: TransformerConfig
    tokenizer: PreTrainedTokenizerBase | None
    source: str
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_torch_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and float32 on the CPU, where this backend is the float32
    numerical reference (the JAX engine's CPU `auto` may be bfloat16: see resolve_dtype)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in TORCH_DTYPES:
        raise ValueError(
            f"dtype {dtype!r} is not supported; choose from auto, {', '.join(TORCH_DTYPES)}"
        )
    return TORCH_DTYPES[dtype]


def checked_hf_tensors(
    hf_config: dict, tensors: dict[str, np.ndarray], source: str
) -> tuple[TransformerConfig, dict[str, np.ndarray]]:
    """(config, exactly the expected tensors) after the JAX loader's checks."""
    _, config = resolve_architecture(hf_config)
    drop_tied_head(config, tensors, source)
    expected = expected_hf_tensors(config)
    check_tensors(expected, tensors, source)
    return config, {name: tensors[name] for name in expected}


def hf_tensors_from_jax(loaded: LoadedModel) -> dict[str, np.ndarray]:
    """The HF-named float32 tensors of a loaded JAX model (inverse of params_from_hf_tensors)."""
    config, module = loaded.config, loaded.model

    def hf_layout(name: str, value) -> np.ndarray:
        array = np.asarray(value, dtype=np.float32)
        return array.T if array.ndim == 2 and name != "embed" else array

    tensors = {
        hf_name: hf_layout(name, getattr(module, name)[...])
        for name, (hf_name, _, _) in top_param_specs(config).items()
    }
    for name, (hf_name, _, _) in layer_param_specs(config).items():
        stacked = np.asarray(getattr(module.layers, name)[...], dtype=np.float32)  # [L, ...]
        for i in range(config.num_layers):
            tensors[f"model.layers.{i}.{hf_name}"] = hf_layout(name, stacked[i])
    return tensors


# The torch twin implements the Llama and Qwen dense decoders only.
TORCH_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
)  # fmt: skip


def check_torch_architecture(config: TransformerConfig) -> None:
    """Refuses families the torch parity backend does not implement (Gemma, MoE)."""
    if config.architecture not in TORCH_ARCHITECTURES:
        raise ValueError(
            f"the torch backend does not support architecture {config.architecture!r}; "
            f"it runs {', '.join(TORCH_ARCHITECTURES)} (use the JAX backend)"
        )


def build_model(
    config: TransformerConfig,
    tensors: dict[str, np.ndarray],
    *,
    dtype: torch.dtype,
    device: torch.device,
    attention: str = "auto",
) -> TorchTransformer:
    """A TorchTransformer holding `tensors` (HF names and layout), without a random init."""
    check_torch_architecture(config)
    impl = resolve_attention(attention, device)
    with torch.device("meta"):
        model = TorchTransformer(config, attention=impl)
    state = {
        # A copy (the arrays may be read-only file maps), through float32: numpy bfloat16
        # (ml_dtypes) has no torch equivalent, and bf16 -> f32 -> bf16 is exact.
        name: torch.tensor(np.asarray(array, dtype=np.float32), dtype=dtype, device=device)
        for name, array in tensors.items()
    }
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)


def load_torch_model(
    model: str,
    *,
    load_format: str = "auto",
    dtype: str = "auto",
    device: str | torch.device | None = None,
    attention: str = "auto",
    seed: int = 0,
    with_tokenizer: bool = True,
) -> TorchLoadedModel:
    """The torch twin of `xlaserve.checkpoints.loader.load_model`: a bundled model name, an HF
    folder, a GGUF file, an orbax folder or a dummy preset (same seed, same weights as JAX)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
    device = torch.device(device) if device is not None else default_device()
    tdtype = resolve_torch_dtype(dtype, device)
    resolve_attention(attention, device)  # fail before reading any weights

    def done(config, tensors, tokenizer, source) -> TorchLoadedModel:
        module = build_model(config, tensors, dtype=tdtype, device=device, attention=attention)
        return TorchLoadedModel(module, config, tokenizer, source, tdtype)

    if load_format == "dummy":
        path, fmt = None, "dummy"
    else:
        path = resolve_bundled(model) or Path(model)
        fmt = detect_format(path) if load_format == "auto" else load_format
    if fmt in ("dummy", "orbax"):
        loaded = load_model(
            model if path is None else str(path),
            load_format=fmt,
            dtype="float32",
            seed=seed,
            with_tokenizer=with_tokenizer,
        )
        return done(loaded.config, hf_tensors_from_jax(loaded), loaded.tokenizer, loaded.source)
    if fmt == "gguf":
        from xlaserve.checkpoints.gguf import read_gguf

        gguf_path = path if path.is_file() else sorted(path.glob("*.gguf"))[0]
        ckpt = read_gguf(gguf_path)
        config, tensors = checked_hf_tensors(ckpt.config, dict(ckpt.tensors), str(gguf_path))
        tokenizer = load_tokenizer(gguf_path) if with_tokenizer else None
        return done(config, tensors, tokenizer, str(gguf_path))
    if not hf.is_hf_folder(path):
        raise FileNotFoundError(f"no config.json in {path}")
    hf_config = hf.read_config(path)
    if compressed_tensors.quantization_config(hf_config):
        raise ValueError(f"backend 'torch' runs 16/32-bit weights; {path} is a pre-quantized "
                         "checkpoint, which the jax backend serves")  # fmt: skip
    resolve_architecture(hf_config)  # fail on the architecture before reading
    config, tensors = checked_hf_tensors(hf_config, hf.read_tensors(path), str(path))
    tokenizer = load_tokenizer(path) if with_tokenizer and has_tokenizer_files(path) else None
    return done(config, tensors, tokenizer, str(path))
