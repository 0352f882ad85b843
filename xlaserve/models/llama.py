"""Llama family: Llama 2, Llama 3 / 3.1 / 3.2 (llama3 rope scaling), Mistral, SmolLM2."""

from xlaserve.models.layers import RopeScaling
from xlaserve.models.transformer import Transformer, TransformerConfig

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")

# Named shapes for `load_format="dummy"` (random weights, no files).
PRESETS = {
    "llama-3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
        max_position_embeddings=8192, eos_token_ids=(128001, 128009), bos_token_id=128000,
    ),
    "llama-3.2-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192),
        max_position_embeddings=131072, tie_word_embeddings=True,
        eos_token_ids=(128001, 128008, 128009), bos_token_id=128000,
    ),
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
        num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
        eos_token_ids=(2,), bos_token_id=1,
    ),
}  # fmt: skip


def rope_settings(hf: dict) -> tuple[float, RopeScaling]:
    """(theta, scaling) from either `rope_theta` + `rope_scaling` or transformers 5's
    `rope_parameters`."""
    params = hf.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or params
    return theta, RopeScaling.from_hf(scaling)


def eos_ids(hf: dict) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)


def config_from_hf(hf: dict) -> TransformerConfig:
    theta, scaling = rope_settings(hf)
    num_heads = hf["num_attention_heads"]
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
    if hf.get("mlp_bias", False):
        raise ValueError("mlp_bias=true is not supported")
    return TransformerConfig(
        architecture=hf["architectures"][0],
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        sliding_window=hf.get("sliding_window") or None,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids(hf),
    )


class LlamaForCausalLM(Transformer):
    pass


def mixtral_config_from_hf(hf: dict) -> TransformerConfig:
    """Mixtral: a Mistral decoder whose MLPs are mixtures of experts (models/moe.py)."""
    from xlaserve.models.moe import moe_config

    return moe_config(config_from_hf(hf), hf)
