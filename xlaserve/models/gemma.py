"""Gemma family: Gemma 2 and Gemma 3 text models, on the shared decoder.

What sets them apart from Llama (all config knobs of TransformerConfig):
- sliding-window and global layers interleaved (Gemma 2: every other layer; Gemma 3: five local
  layers, then one global), Gemma 3's local layers with their own unscaled RoPE base;
- RMSNorm with (1 + w) weights (folded into the stored weight at load), a norm after attention
  and after the MLP besides the usual pre-norms, per-head q/k norms (Gemma 3);
- a GeGLU MLP (tanh-approximated gelu), embeddings scaled by sqrt(hidden);
- attention scaled by query_pre_attn_scalar**-0.5, and tanh soft-capping of attention scores
  and final logits (Gemma 2).
"""

from xlaserve.models.layers import RopeScaling
from xlaserve.models.llama import eos_ids
from xlaserve.models.transformer import Transformer, TransformerConfig

ARCHITECTURES = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")

# HF hidden_activation names of the tanh-approximated gelu.
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")
# Layers per repeat of the local/global pattern when a config lists no layer_types.
SLIDING_WINDOW_PATTERN = {"Gemma2ForCausalLM": 2, "Gemma3ForCausalLM": 6}
HF_LAYER_TYPES = {"sliding_attention": "sliding", "full_attention": "full"}


def gemma_layer_types(num_layers: int, pattern: int) -> tuple[str, ...]:
    """Every `pattern`-th layer global, the others sliding (HF's default layout)."""
    return tuple("full" if (i + 1) % pattern == 0 else "sliding" for i in range(num_layers))


def _gemma_preset(layers: int, pattern: int, **kw) -> dict:
    return dict(
        num_layers=layers, layer_types=gemma_layer_types(layers, pattern), hidden_act="gelu_tanh",
        embed_scale=kw["hidden_size"] ** 0.5, sandwich_norms=True, norm_weight_offset=1.0,
        tie_word_embeddings=True, rms_norm_eps=1e-6, bos_token_id=2, **kw,
    )  # fmt: skip


# Named shapes for `load_format="dummy"` (random weights, no files).
PRESETS = {
    "gemma-3-1b": _gemma_preset(
        26, 6, vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_heads=4,
        num_kv_heads=1, head_dim=256, sliding_window=512, rope_theta=1000000.0,
        local_rope_theta=10000.0, qk_norm=True, query_pre_attn_scalar=256.0,
        max_position_embeddings=32768, eos_token_ids=(1, 106),
    ),
    "gemma-3-270m": _gemma_preset(
        18, 6, vocab_size=262144, hidden_size=640, intermediate_size=2048, num_heads=4,
        num_kv_heads=1, head_dim=256, sliding_window=512, rope_theta=1000000.0,
        local_rope_theta=10000.0, qk_norm=True, query_pre_attn_scalar=256.0,
        max_position_embeddings=32768, eos_token_ids=(1, 106),
    ),
    "gemma-2-2b": _gemma_preset(
        26, 2, vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_heads=8,
        num_kv_heads=4, head_dim=256, sliding_window=4096, rope_theta=10000.0,
        query_pre_attn_scalar=256.0, attn_logit_softcap=50.0, final_logit_softcap=30.0,
        max_position_embeddings=8192, eos_token_ids=(1, 107),
    ),
}  # fmt: skip


def _rope(hf: dict, arch: str) -> tuple[float, RopeScaling, float | None]:
    """(global theta, global scaling, local theta or None) from either transformers 5's
    per-layer-type `rope_parameters` or the older rope_theta / rope_scaling /
    rope_local_base_freq keys, with HF's defaults."""
    params = hf.get("rope_parameters") or {}
    is_gemma3 = arch == "Gemma3ForCausalLM"
    if "full_attention" in params:
        full, local = params["full_attention"], params.get("sliding_attention") or {}
        theta = float(full.get("rope_theta", 1e6 if is_gemma3 else 1e4))
        local_theta = float(local.get("rope_theta", 1e4)) if is_gemma3 else None
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"sliding-layer rope type {local['rope_type']!r} is not supported")
        return theta, RopeScaling.from_hf(full), local_theta
    default_theta = 1e6 if is_gemma3 else 1e4
    theta = float(params.get("rope_theta", hf.get("rope_theta", default_theta)))
    scaling = RopeScaling.from_hf(hf.get("rope_scaling") or params)
    local_theta = float(hf.get("rope_local_base_freq", 1e4)) if is_gemma3 else None
    return theta, scaling, local_theta


def config_from_hf(hf: dict) -> TransformerConfig:
    arch = hf["architectures"][0]
    is_gemma3 = arch == "Gemma3ForCausalLM"
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in GELU_TANH:
        raise ValueError(f"hidden_activation {act!r} is not supported (only gelu_pytorch_tanh)")
    if hf.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=true (embedding Gemma) is not supported")
    num_layers = hf["num_hidden_layers"]
    if hf.get("layer_types"):
        unknown = set(hf["layer_types"]) - set(HF_LAYER_TYPES)
        if unknown:
            raise ValueError(f"layer_types {sorted(unknown)} are not supported")
        layer_types = tuple(HF_LAYER_TYPES[t] for t in hf["layer_types"])
    else:
        pattern = hf.get("sliding_window_pattern") or SLIDING_WINDOW_PATTERN[arch]
        layer_types = gemma_layer_types(num_layers, int(pattern))
    theta, scaling, local_theta = _rope(hf, arch)
    hidden, num_heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or 256
    gemma2_caps = (None, None) if is_gemma3 else (50.0, 30.0)
    attn_cap = hf.get("attn_logit_softcapping", gemma2_caps[0])
    final_cap = hf.get("final_logit_softcapping", gemma2_caps[1])
    return TransformerConfig(
        architecture=arch,
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        intermediate_size=hf["intermediate_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        attention_bias=bool(hf.get("attention_bias", False)),
        qk_norm=is_gemma3,
        sliding_window=hf.get("sliding_window") or 4096,
        bos_token_id=hf.get("bos_token_id", 2),
        eos_token_ids=eos_ids(hf) or (1,),
        layer_types=layer_types,
        local_rope_theta=local_theta,
        hidden_act="gelu_tanh",
        embed_scale=hidden**0.5,
        sandwich_norms=True,
        norm_weight_offset=1.0,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or 256),
        attn_logit_softcap=None if attn_cap is None else float(attn_cap),
        final_logit_softcap=None if final_cap is None else float(final_cap),
    )


# Gemma's chat format, for checkpoints that carry no template (the Gemma 3 270M GGUF): turns
# "<start_of_turn>{user|model}\n{text}<end_of_turn>\n" after BOS, a system message put at the
# head of the first user turn, and "<start_of_turn>model\n" as the generation prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Gemma turns must alternate user, assistant, user, ...') }}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{%- if loop.first and system -%}{{ system | trim }}{{ '\n\n' }}{%- endif -%}"
    "{%- if m['content'] is string -%}{{ m['content'] | trim }}"
    "{%- else -%}{%- for part in m['content'] -%}{%- if part['type'] == 'text' -%}"
    "{{ part['text'] | trim }}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
END_OF_TURN = "<end_of_turn>"


class GemmaForCausalLM(Transformer):
    pass
