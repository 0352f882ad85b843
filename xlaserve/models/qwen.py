"""Qwen family: Qwen2 / Qwen2.5 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm)."""

import dataclasses

from xlaserve.models.llama import config_from_hf as llama_config_from_hf
from xlaserve.models.transformer import Transformer, TransformerConfig

ARCHITECTURES = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")

PRESETS = {
    "qwen2.5-0.5b": dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24,
        num_heads=14, num_kv_heads=2, head_dim=64, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=32768, tie_word_embeddings=True, attention_bias=True,
        eos_token_ids=(151645, 151643), bos_token_id=151643,
    ),
    "qwen3-0.6b": dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
        num_heads=16, num_kv_heads=8, head_dim=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
        max_position_embeddings=40960, tie_word_embeddings=True, qk_norm=True,
        eos_token_ids=(151645, 151643), bos_token_id=151643,
    ),
}  # fmt: skip


def config_from_hf(hf: dict) -> TransformerConfig:
    config = llama_config_from_hf(hf)
    is_qwen2 = hf["architectures"][0] == "Qwen2ForCausalLM"
    # Qwen configs carry `sliding_window` even when `use_sliding_window` is false; when true,
    # HF windows only the layers from `max_window_layers` on, which we do not implement.
    if hf.get("use_sliding_window", False):
        raise ValueError("Qwen use_sliding_window=true (per-layer sliding window) is not supported")
    return dataclasses.replace(
        config,
        # Qwen2 always has q/k/v biases; Qwen3 has none and normalizes q and k per head.
        attention_bias=is_qwen2 or bool(hf.get("attention_bias", False)),
        qk_norm=not is_qwen2,
        sliding_window=None,
        # Qwen2.5-VL's decoder (multimodal/qwen_loader.py): multi-section rope.
        mrope_section=tuple((hf.get("rope_parameters") or {}).get("mrope_section") or ()),
    )


class QwenForCausalLM(Transformer):
    pass


def qwen3_moe_config_from_hf(hf: dict) -> TransformerConfig:
    """Qwen3-MoE: the Qwen3 decoder whose MLPs are mixtures of experts (models/moe.py)."""
    from xlaserve.models.moe import moe_config

    return moe_config(config_from_hf(hf), hf)
