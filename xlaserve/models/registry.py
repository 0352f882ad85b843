"""Maps HF `architectures` names and dummy preset names to model classes and configs."""

from collections.abc import Callable

from xlaserve.models import gemma, llama, moe, qwen
from xlaserve.models.transformer import Transformer, TransformerConfig

# architecture -> (model class, HF config.json dict -> TransformerConfig)
MODEL_REGISTRY: dict[str, tuple[type[Transformer], Callable[[dict], TransformerConfig]]] = {
    **{arch: (llama.LlamaForCausalLM, llama.config_from_hf) for arch in llama.ARCHITECTURES},
    **{arch: (qwen.QwenForCausalLM, qwen.config_from_hf) for arch in qwen.ARCHITECTURES},
    **{arch: (gemma.GemmaForCausalLM, gemma.config_from_hf) for arch in gemma.ARCHITECTURES},
    moe.MIXTRAL: (Transformer, llama.mixtral_config_from_hf),
    moe.QWEN3_MOE: (Transformer, qwen.qwen3_moe_config_from_hf),
}

PRESETS: dict[str, tuple[str, dict]] = {
    **{name: ("LlamaForCausalLM", kw) for name, kw in llama.PRESETS.items()},
    **{
        name: ("Qwen3ForCausalLM" if kw.get("qk_norm") else "Qwen2ForCausalLM", kw)
        for name, kw in qwen.PRESETS.items()
    },
    **{
        name: ("Gemma3ForCausalLM" if kw.get("qk_norm") else "Gemma2ForCausalLM", kw)
        for name, kw in gemma.PRESETS.items()
    },
    **moe.PRESETS,
}


def supported_architectures() -> list[str]:
    return sorted(MODEL_REGISTRY)


def resolve_architecture(hf_config: dict) -> tuple[type[Transformer], TransformerConfig]:
    """Model class and config for an HF config.json dict; unknown architectures are errors."""
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in MODEL_REGISTRY:
            model_cls, to_config = MODEL_REGISTRY[arch]
            return model_cls, to_config({**hf_config, "architectures": [arch]})
    raise ValueError(
        f"unsupported model architecture {archs or hf_config.get('model_type')!r}; "
        f"supported: {', '.join(supported_architectures())}"
    )


def preset_config(name: str) -> tuple[type[Transformer], TransformerConfig]:
    """Model class and config of a named dummy preset such as 'llama-3-8b'."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    arch, kwargs = PRESETS[name]
    model_cls, _ = MODEL_REGISTRY[arch]
    return model_cls, TransformerConfig(architecture=arch, **kwargs)
