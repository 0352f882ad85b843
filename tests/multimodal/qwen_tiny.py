"""A tiny random-weight Qwen2.5-VL checkpoint built here: the SmolLM2 tokenizer plus Qwen's
vision tokens, a Qwen-style chat template, transformers' PIL image processor with a small
pixel range (4 .. 64 merged tokens per image) and a 2-window, 3-layer vision tower."""

import numpy as np
import torch

from xlaserve.checkpoints.presets import resolve_bundled
from xlaserve.checkpoints.tokenizer import load_tokenizer

ARCH = "Qwen2_5_VLForConditionalGeneration"
VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 64


def qwen_tokenizer():
    tok = load_tokenizer(resolve_bundled("smollm2-135m-instruct"))
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def qwen_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def tiny_qwen_vl(tokenizer, seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=56, out_hidden_size=64, fullatt_block_indexes=[1]),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, rms_norm_eps=1e-6, eos_token_id=2,
                         bos_token_id=1, rope_parameters={"rope_type": "default",
                         "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
        image_token_id=ids["<|image_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], video_token_id=ids["<|video_pad|>"],
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger than the default init, so images move the logits visibly
        for p in model.model.visual.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.1)
    return model


def save_qwen_vl(folder, model, tokenizer) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    qwen_image_processor().save_pretrained(folder)


def reference_inputs(tokenizer, text: str, images: list) -> dict:
    """transformers-side inputs: the image processor's patches, and the placeholders
    expanded to grid.prod() / 4 image tokens (written out here, not by our code)."""
    proc = qwen_image_processor()
    out = proc(images=images, return_tensors="pt") if images else {}
    pieces = text.split("<|image_pad|>")
    expanded = pieces[0]
    for i, piece in enumerate(pieces[1:]):
        n = int(out["image_grid_thw"][i].prod()) // 4
        expanded += "<|image_pad|>" * n + piece
    ids = torch.tensor([tokenizer(expanded)["input_ids"]])
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "mm_token_type_ids": (ids == image_id).int()}  # fmt: skip
    if images:
        inputs["pixel_values"] = out["pixel_values"]
        inputs["image_grid_thw"] = out["image_grid_thw"]
    return inputs


def image(width: int, height: int, seed: int):
    import PIL.Image

    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
