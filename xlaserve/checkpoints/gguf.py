"""Read llama.cpp GGUF checkpoints into Hugging Face names, layout and config.

The result looks like an HF checkpoint (config.json dict + float32 tensors), so the rest of the
loader treats GGUF and safetensors the same. Every tensor is dequantized to float32.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

# GGUF architecture -> (HF architecture class, HF model_type).
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
}
GEMMA_ARCHS = ("gemma2", "gemma3")

# Gemma's norms around attention and the MLP have names of their own (its `ffn_norm` is the
# MLP pre-norm, HF's pre_feedforward_layernorm; post_attention_layernorm follows attention).
_GEMMA_LAYER_NAMES = {
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    **{
        f"attn_{g}.{kind}": f"self_attn.{h}_proj.{kind}"
        for g, h in [("q", "q"), ("k", "k"), ("v", "v"), ("output", "o")]
        for kind in ("weight", "bias")
    },
}

_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")

# GGUF `{arch}.rope.scaling.<key>` -> HF rope_scaling key ("finetuned" is informational only).
_ROPE_SCALING_KEYS = {
    "factor": "factor",
    "original_context_length": "original_max_position_embeddings",
    "attn_factor": "attention_factor",
    "yarn_beta_fast": "beta_fast",
    "yarn_beta_slow": "beta_slow",
}


@dataclass(frozen=True)
class GGUFCheckpoint:
    """A GGUF file converted to HF conventions.

    `config` is a config.json-style dict; `tensors` maps HF names to float32 arrays in HF layout
    (a Linear weight is [out, in]). `lm_head.weight` is absent when embeddings are tied.
    """

    path: Path
    config: dict[str, Any]
    tensors: dict[str, np.ndarray]


def find_gguf_file(model_dir_or_file: str | os.PathLike) -> Path:
    """Return the GGUF file itself, or the single `*.gguf` file inside a directory."""
    path = Path(model_dir_or_file)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"GGUF file or directory not found: {path}")
    candidates = sorted(path.glob("*.gguf"))
    if len(candidates) != 1:
        names = [c.name for c in candidates]
        raise ValueError(f"expected exactly one .gguf file in {path}, found {names}")
    return candidates[0]


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Read a GGUF file: metadata -> HF config dict, tensors -> float32 arrays with HF names.

    Supports the `llama`, `qwen2`, `qwen3`, `gemma2` and `gemma3` architectures and every
    quantization type that
    `gguf.quants.dequantize` knows. Raises FileNotFoundError for a missing file and ValueError
    for an invalid file, an unsupported architecture, or unknown, missing or mis-shaped tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(path, "r")
    except OSError:
        raise
    except Exception as err:  # the reader raises many types on corrupt input; all mean "invalid"
        raise ValueError(f"{path} is not a valid GGUF file: {err}") from err

    arch = _field(reader, path, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: {sorted(_ARCHITECTURES)}"
        )
    by_name = {t.name: t for t in reader.tensors}
    config = _config(reader, path, arch, by_name)

    tensors: dict[str, np.ndarray] = {}
    for name, tensor in by_name.items():
        if name == "rope_freqs.weight":
            continue  # already folded into config["rope_scaling"] by _llama3_rope_scaling
        hf_name = _hf_name(name, arch)
        if hf_name is None:
            raise ValueError(f"{path}: unknown GGUF tensor {name!r} for architecture {arch!r}")
        tensors[hf_name] = _dequantize(tensor, path)
        if arch in GEMMA_ARCHS and name.endswith("norm.weight"):
            # llama.cpp stores Gemma's (1 + w) norm weights with the 1 added; HF stores w.
            tensors[hf_name] = tensors[hf_name] - np.float32(1.0)
    _check_tensors(path, config, tensors)

    if arch == "llama":
        # llama.cpp interleaves q/k rows for its rope; HF rotates halves. Undo it per head.
        for name, value in tensors.items():
            if ".q_proj." in name or ".k_proj." in name:
                heads = config[
                    "num_attention_heads" if ".q_proj." in name else "num_key_value_heads"
                ]
                tensors[name] = _unpermute_rows(value, heads)
    return GGUFCheckpoint(path=path, config=config, tensors=tensors)


def _field(reader: gguf.GGUFReader, path: Path, key: str, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise ValueError(f"{path}: GGUF metadata key {key!r} is missing")
        return default
    return field.contents()


def _hf_name(name: str, arch: str = "llama") -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_RE.fullmatch(name)
    names = _LAYER_NAMES | _GEMMA_LAYER_NAMES if arch in GEMMA_ARCHS else _LAYER_NAMES
    if match is None or match.group(2) not in names:
        return None
    return f"model.layers.{match.group(1)}.{names[match.group(2)]}"


def _dequantize(tensor: gguf.ReaderTensor, path: Path) -> np.ndarray:
    # GGUF lists dims innermost first (ne[0]); numpy/HF order is the reverse.
    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as err:
        raise ValueError(f"{path}: tensor {tensor.name!r}: {err}") from err
    if values.size != int(np.prod(shape)):
        raise ValueError(f"{path}: tensor {tensor.name!r} data does not match shape {shape}")
    # F32 comes back as a view of the read-only memmap; copy so nothing keeps the file open.
    copy = tensor.tensor_type == gguf.GGMLQuantizationType.F32
    return values.astype(np.float32, copy=copy).reshape(shape)


def _unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: rows [h, 2, d/2] were stored as [h, d/2, 2]."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _config(
    reader: gguf.GGUFReader, path: Path, arch: str, by_name: dict[str, gguf.ReaderTensor]
) -> dict[str, Any]:
    def meta(key: str, default: Any = ...) -> Any:
        return _field(reader, path, f"{arch}.{key}", default)

    hidden = int(meta("embedding_length"))
    heads = int(meta("attention.head_count"))
    head_dim = int(meta("attention.key_length", hidden // heads))
    rope_dim = meta("rope.dimension_count", None)
    if rope_dim is not None and int(rope_dim) != head_dim:
        raise ValueError(f"{path}: partial rotary ({rope_dim} of {head_dim} dims) is unsupported")
    if "token_embd.weight" not in by_name:
        raise ValueError(f"{path}: GGUF tensor 'token_embd.weight' is missing")
    architecture, model_type = _ARCHITECTURES[arch]
    rope_theta = float(meta("rope.freq_base", 10000.0))
    rope_scaling = _rope_scaling(reader, path, arch)
    if "rope_freqs.weight" in by_name:
        rope_freqs = _dequantize(by_name["rope_freqs.weight"], path)
        rope_scaling = _llama3_rope_scaling(path, rope_scaling, rope_freqs, rope_theta, head_dim)
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(meta("context_length")),
        # The embedding's row count is what the weights need, even if the token list is shorter.
        "vocab_size": int(by_name["token_embd.weight"].shape[1]),
        "tie_word_embeddings": "output.weight" not in by_name,
        "bos_token_id": _field(reader, path, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _field(reader, path, "tokenizer.ggml.eos_token_id", None),
        # Qwen2 always has q/k/v biases; requiring them turns a broken file into a clear error.
        "attention_bias": arch == "qwen2" or "blk.0.attn_q.bias" in by_name,
        "torch_dtype": "float32",
    }
    if arch in GEMMA_ARCHS:  # the rest of a Gemma config takes HF's defaults, as transformers
        config["sliding_window"] = int(meta("attention.sliding_window"))
        # Chat replies end with <end_of_turn> (HF's instruct configs list it beside <eos>).
        tokens = _field(reader, path, "tokenizer.ggml.tokens", [])
        if "<end_of_turn>" in tokens and config["eos_token_id"] is not None:
            config["eos_token_id"] = [config["eos_token_id"], tokens.index("<end_of_turn>")]
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            value = meta(key, None)
            if value is not None:
                config[key] = float(value)
    return config


def _rope_scaling(reader: gguf.GGUFReader, path: Path, arch: str) -> dict[str, Any] | None:
    prefix = f"{arch}.rope.scaling."
    found = {
        k[len(prefix) :]: reader.fields[k].contents() for k in reader.fields if k.startswith(prefix)
    }
    rope_type = found.pop("type", None)
    found.pop("finetuned", None)
    if rope_type in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": rope_type}
    for key, value in found.items():
        if key not in _ROPE_SCALING_KEYS:
            raise ValueError(f"{path}: unsupported GGUF metadata key {prefix + key!r}")
        scaling[_ROPE_SCALING_KEYS[key]] = value
    return scaling


def _llama3_rope_scaling(
    path: Path, scaling: dict[str, Any] | None, freqs: np.ndarray, theta: float, head_dim: int
) -> dict[str, Any]:
    """Recover HF's llama3 rope_scaling from the per-frequency factors llama.cpp stores.

    llama.cpp's converter bakes Llama 3.1+ scaling into `rope_freqs.weight` and writes no scaling
    metadata. Every released Llama 3.x uses low/high freq factors 1/4 and an original context of
    8192, so accept the tensor only if those parameters reproduce it; anything else is an error
    rather than a silently different rope.
    """
    if scaling is not None:
        return scaling  # the metadata already says what the factors encode
    params = {
        "rope_type": "llama3",
        "factor": float(freqs.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    expected = _llama3_rope_factors(
        theta, head_dim, **{k: v for k, v in params.items() if k != "rope_type"}
    )
    if freqs.shape != expected.shape or not np.allclose(freqs, expected, rtol=1e-5):
        raise ValueError(f"{path}: rope_freqs.weight does not match Llama 3 rope scaling")
    return params


def _llama3_rope_factors(
    theta: float,
    head_dim: int,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> np.ndarray:
    """Per-frequency divisors of Llama 3 rope scaling, as llama.cpp stores them. Shape [H/2]."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    mid = 1 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < original_max_position_embeddings / high_freq_factor, 1.0, mid)
    out = np.where(wavelen > original_max_position_embeddings / low_freq_factor, factor, out)
    return out.astype(np.float32)


def _check_tensors(path: Path, config: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """Every expected tensor is present with its HF shape, and nothing else is."""
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    n, k, h = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    expected = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not config["tie_word_embeddings"]:
        expected["lm_head.weight"] = (v, d)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        layer = {
            "input_layernorm.weight": (d,),
            "post_attention_layernorm.weight": (d,),
            "self_attn.q_proj.weight": (n * h, d),
            "self_attn.k_proj.weight": (k * h, d),
            "self_attn.v_proj.weight": (k * h, d),
            "self_attn.o_proj.weight": (d, n * h),
            "mlp.gate_proj.weight": (f, d),
            "mlp.up_proj.weight": (f, d),
            "mlp.down_proj.weight": (d, f),
        }
        if config["attention_bias"]:
            biased = [("q", n * h), ("k", k * h), ("v", k * h)]
            if config["model_type"] == "llama":  # HF Llama's attention_bias covers o_proj too
                biased.append(("o", d))
            layer |= {f"self_attn.{x}_proj.bias": (s,) for x, s in biased}
        if config["model_type"] in ("qwen3", "gemma3_text"):
            layer |= {"self_attn.q_norm.weight": (h,), "self_attn.k_norm.weight": (h,)}
        if config["model_type"] in ("gemma2", "gemma3_text"):
            del layer["post_attention_layernorm.weight"]
            layer |= {
                f"{name}.weight": (d,)
                for name in (
                    "post_attention_layernorm", "pre_feedforward_layernorm",
                    "post_feedforward_layernorm",
                )
            }  # fmt: skip
        expected |= {p + name: shape for name, shape in layer.items()}
    missing = sorted(expected.keys() - tensors.keys())
    extra = sorted(tensors.keys() - expected.keys())
    if missing or extra:
        raise ValueError(f"{path}: missing tensors {missing[:8]}, unexpected tensors {extra[:8]}")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ValueError(
                f"{path}: tensor {name!r} has shape {tensors[name].shape}, want {shape}"
            )
