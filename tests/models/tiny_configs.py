"""Tiny random-weight HF configs of every supported architecture, saved with save_pretrained."""

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

COMMON = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=112,
    num_hidden_layers=3,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)

TINY = {
    # Llama 2 style: multi-head attention, no rope scaling.
    "llama2": (LlamaForCausalLM, LlamaConfig, dict(num_attention_heads=4, num_key_value_heads=4)),
    # Llama 3.1 style: GQA and llama3 rope scaling (small original length so it matters).
    "llama3": (
        LlamaForCausalLM,
        LlamaConfig,
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    # Llama 3.2 / SmolLM2 style: MQA-ish GQA with tied embeddings.
    "llama_tied": (
        LlamaForCausalLM,
        LlamaConfig,
        dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    ),
    # Mistral with a sliding window shorter than the prompts.
    "mistral": (
        MistralForCausalLM,
        MistralConfig,
        dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=12),
    ),
    "qwen2": (
        Qwen2ForCausalLM,
        Qwen2Config,
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    ),
    # Qwen3: q/k norm, head_dim not equal to hidden / heads.
    "qwen3": (
        Qwen3ForCausalLM,
        Qwen3Config,
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    ),
    # Gemma 2: sliding/global layers alternating (window shorter than the prompts), soft-capped
    # attention scores and logits (caps small enough to bite), query_pre_attn_scalar != H.
    "gemma2": (
        Gemma2ForCausalLM,
        Gemma2Config,
        dict(
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=12,
            query_pre_attn_scalar=24, attn_logit_softcapping=3.0, final_logit_softcapping=4.0,
            attn_implementation="eager",
        ),
    ),
    # Gemma 3: q/k norms, local layers with their own rope base, the global one with linear
    # rope scaling (as the 4B+ models), a window shorter than the prompts.
    "gemma3": (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        dict(
            num_attention_heads=4, num_key_value_heads=1, head_dim=32, sliding_window=12,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
            attn_implementation="eager",
        ),
    ),
    # Mixtral: 8 experts, top 2 renormalised.
    "mixtral": (
        MixtralForCausalLM,
        MixtralConfig,
        dict(num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
             num_experts_per_tok=2),
    ),
    # Qwen3-MoE: 8 experts of their own width, top 3, top-k weights not renormalised.
    "qwen3_moe": (
        Qwen3MoeForCausalLM,
        Qwen3MoeConfig,
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8,
             num_experts_per_tok=3, moe_intermediate_size=48, norm_topk_prob=False,
             decoder_sparse_step=1, mlp_only_layers=[]),
    ),
}  # fmt: skip


def make_tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny HF model with weights large enough that logits spread over several units."""
    model_cls, config_cls, extra = TINY[name]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**COMMON, **extra)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                # Gemma norms scale by (1 + w): the same effective weights as the others.
                offset = 0.0 if model.config.model_type.startswith("gemma") else 1.0
                p.copy_(offset + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    return model


def save_tiny_model(name: str, folder, seed: int = 0) -> torch.nn.Module:
    model = make_tiny_model(name, seed)
    model.save_pretrained(folder)
    return model
