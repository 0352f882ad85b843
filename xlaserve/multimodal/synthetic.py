"""A SmolVLM checkpoint assembled here, for benchmarks where no VLM weights are installed: the
bundled SmolLM2-135M-Instruct text weights (SmolVLM-256M's text model), a seeded random vision
tower of a named shape, the SmolLM2 tokenizer plus SmolVLM's image tokens, and SmolVLM's PIL
image processor. Needs torch and transformers (as the tests' references do)."""

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
