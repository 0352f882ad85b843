"""Vision-language checkpoints assembled here, for benchmarks where no VLM weights are
installed: the bundled SmolLM2-135M-Instruct text weights, a seeded random vision tower of a
named shape, the SmolLM2 tokenizer plus the family's image tokens, and the family's PIL image
processor. SmolVLM (its text model is SmolLM2) or Qwen2.5-VL (SmolLM2's weights in a Qwen2
decoder with zero q/k/v biases and M-RoPE: on text alike, the rope rows are equal).
Needs torch and transformers (as the tests' references do)."""

from __future__ import annotations

from pathlib import Path

IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
    f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)
]
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'] is string %}{{': ' + message['content']}}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# name -> (vision config, scale_factor, tile pixels, longest image edge)
VISION_PRESETS = {
    # SmolVLM-256M's SigLIP: 512-pixel tiles of 16-pixel patches, 64 tokens per tile.
    "smolvlm-256m": (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, image_size=512, patch_size=16), 4, 512, 2048),
    # A quarter of its depth and width on 256-pixel tiles (CPU benchmarks): 64 tokens per tile.
    "small": (dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                   num_attention_heads=6, image_size=256, patch_size=16), 2, 256, 512),
}  # fmt: skip


def build_smolvlm(folder: str | Path, vision: str = "small", seed: int = 0) -> Path:
    """Writes the checkpoint to `folder` (config.json, model.safetensors, tokenizer, image
    processor) and returns it."""
    import torch
    from transformers import AutoModelForCausalLM, SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import (
        SmolVLMImageProcessorPil,
    )

    from xlaserve.checkpoints.presets import resolve_bundled
    from xlaserve.checkpoints.tokenizer import load_tokenizer

    if vision not in VISION_PRESETS:
        raise ValueError(f"vision preset {vision!r} is not one of {sorted(VISION_PRESETS)}")
    vision_config, scale, tile, longest = VISION_PRESETS[vision]
    gguf = resolve_bundled("smollm2-135m-instruct")
    text_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                      dtype=torch.float32)  # fmt: skip
    tokenizer = load_tokenizer(gguf)
    tokenizer.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    tokenizer.chat_template = CHAT_TEMPLATE
    text = {**text_model.config.to_dict(), "vocab_size": len(tokenizer)}
    text.pop("architectures", None)
    config = SmolVLMConfig(vision_config=vision_config, text_config=text, scale_factor=scale,
                           image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                           tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(config).eval()
    state = text_model.model.state_dict()
    embed = state["embed_tokens.weight"]
    extra = torch.randn(len(tokenizer) - embed.shape[0], embed.shape[1],
                        generator=torch.Generator().manual_seed(seed)) * 0.02  # fmt: skip
    state["embed_tokens.weight"] = torch.cat([embed, extra])
    model.model.text_model.load_state_dict(state)
    model.tie_weights()
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    processor = SmolVLMImageProcessorPil(
        size={"longest_edge": longest}, max_image_size={"longest_edge": tile}
    )
    processor.save_pretrained(folder)
    return folder


QWEN_VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# name -> (vision config, max pixels per image)
QWEN_VISION_PRESETS = {
    # Qwen2.5-VL-3B's tower shape (32 layers of 1280, windows of 112 pixels).
    "qwen2.5-vl-3b": (dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           fullatt_block_indexes=[7, 15, 23, 31]), 28 * 28 * 256),
    # A quarter of its depth and width (CPU benchmarks).
    "small": (dict(depth=8, hidden_size=320, intermediate_size=864, num_heads=4,
                   fullatt_block_indexes=[3, 7]), 28 * 28 * 256),
}  # fmt: skip


def build_qwen_vl(folder: str | Path, vision: str = "small", seed: int = 0) -> Path:
    """A Qwen2.5-VL checkpoint (see the module docstring) written to `folder`."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from xlaserve.checkpoints.presets import resolve_bundled
    from xlaserve.checkpoints.tokenizer import load_tokenizer

    if vision not in QWEN_VISION_PRESETS:
        raise ValueError(f"vision preset {vision!r} is not one of {sorted(QWEN_VISION_PRESETS)}")
    vision_config, max_pixels = QWEN_VISION_PRESETS[vision]
    gguf = resolve_bundled("smollm2-135m-instruct")
    text_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                      dtype=torch.float32)  # fmt: skip
    tokenizer = load_tokenizer(gguf)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_VISION_TOKENS})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    t = text_model.config
    head_dim = t.hidden_size // t.num_attention_heads
    quarter = head_dim // 8  # Qwen's (16, 24, 24) of 64 frequencies, scaled to this head
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in QWEN_VISION_TOKENS}
    config = Qwen2_5_VLConfig(
        vision_config=dict(vision_config, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=112, out_hidden_size=t.hidden_size),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=t.hidden_size,
                         intermediate_size=t.intermediate_size,
                         num_hidden_layers=t.num_hidden_layers,
                         num_attention_heads=t.num_attention_heads,
                         num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps,
                         max_position_embeddings=t.max_position_embeddings,
                         eos_token_id=t.eos_token_id, bos_token_id=t.bos_token_id,
                         rope_parameters={"rope_type": "default",
                                          "rope_theta": t.rope_parameters["rope_theta"],
                                          "mrope_section": [quarter, 3 * quarter // 2,
                                                            3 * quarter // 2]}),
        image_token_id=ids["<|image_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], video_token_id=ids["<|video_pad|>"],
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    state = text_model.model.state_dict()
    embed = state["embed_tokens.weight"]
    extra = torch.randn(len(tokenizer) - embed.shape[0], embed.shape[1],
                        generator=torch.Generator().manual_seed(seed)) * 0.02  # fmt: skip
    state["embed_tokens.weight"] = torch.cat([embed, extra])
    for name, value in model.model.language_model.state_dict().items():
        if name.endswith("_proj.bias"):
            state[name] = torch.zeros_like(value)  # SmolLM2 has no q/k/v biases
    model.model.language_model.load_state_dict(state)
    model.tie_weights()
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    Qwen2VLImageProcessorPil(max_pixels=max_pixels).save_pretrained(folder)
    return folder
