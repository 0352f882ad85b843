"""Loads an HF Idefics3 / SmolVLM folder: the text decoder (our Llama `Transformer`), the
vision tower and connector (`models/siglip.py`), and the model's image processor; or a
Qwen2.5-VL folder (`qwen_loader`: a Qwen2 decoder with M-RoPE, `models/qwen_vit.py`).

Every tensor is accounted for: the text tensors (`model.text_model.*`, `lm_head`) are checked
by the decoder's loader, the vision ones against `siglip.expected_hf_tensors`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xlaserve.models import siglip

IDEFICS3_ARCHITECTURES = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
ARCHITECTURES = (*IDEFICS3_ARCHITECTURES, "Qwen2_5_VLForConditionalGeneration")
VISION_PREFIXES = ("model.vision_model.", "model.connector.")


def is_multimodal(hf_config: dict) -> bool:
    return any(a in ARCHITECTURES for a in hf_config.get("architectures") or ())


@dataclass
class VisionParts:
    """What a vision-language checkpoint adds to its text decoder."""

    config: siglip.VisionConfig  # (Qwen2.5-VL: models/qwen_vit.QwenVisionConfig)
    params: dict  # numpy tree (models/siglip.params_from_hf_tensors)
    image_token_id: int
    architecture: str
    folder: Path


def text_config(hf_config: dict) -> dict:
    """The decoder's config.json dict (a Llama: SmolLM2 in SmolVLM)."""
    text = dict(hf_config["text_config"])
    if text.get("model_type", "llama") != "llama":
        raise ValueError(f"text model type {text.get('model_type')!r} is not supported in "
                         "Idefics3 / SmolVLM checkpoints (llama)")  # fmt: skip
    text["architectures"] = ["LlamaForCausalLM"]
    text["tie_word_embeddings"] = hf_config.get(
        "tie_word_embeddings", text.get("tie_word_embeddings", False)
    )
    return text


def split_tensors(
    hf_config: dict, tensors: dict[str, np.ndarray], folder: Path, check_tensors
) -> tuple[dict, dict[str, np.ndarray], VisionParts]:
    """(text config dict, text tensors under decoder names, vision parts); check_tensors
    (expected shapes, tensors, source) refuses missing, unexpected or mis-shaped ones."""
    arch = next(a for a in hf_config["architectures"] if a in ARCHITECTURES)
    if arch not in IDEFICS3_ARCHITECTURES:
        from xlaserve.multimodal.qwen_loader import split_qwen_tensors

        return split_qwen_tensors(hf_config, tensors, folder, check_tensors, VisionParts)
    config = siglip.VisionConfig.from_hf(hf_config)
    vision = {k: v for k, v in tensors.items() if k.startswith(VISION_PREFIXES)}
    check_tensors(siglip.expected_hf_tensors(config), vision, str(folder))
    text = {}
    for name, value in tensors.items():
        if name.startswith(VISION_PREFIXES):
            continue
        if name.startswith("model.text_model."):
            name = "model." + name[len("model.text_model.") :]
        text[name] = value
    image_token_id = hf_config.get("image_token_id", hf_config.get("image_token_index"))
    if image_token_id is None:
        raise ValueError(f"{folder}: config.json has no image_token_id")
    parts = VisionParts(config, siglip.params_from_hf_tensors(config, vision),
                        int(image_token_id), arch, folder)  # fmt: skip
    return text_config(hf_config), text, parts
