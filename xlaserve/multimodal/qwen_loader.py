"""Splits an HF Qwen2.5-VL folder into its text decoder (a Qwen2 `Transformer` with M-RoPE)
and its vision tower (`models/qwen_vit.py`). Both tensor layouts are read: transformers 5's
(`model.language_model.*`, `model.visual.*`) and the original (`model.*`, `visual.*`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xlaserve.models import qwen_vit

ARCHITECTURE = "Qwen2_5_VLForConditionalGeneration"


def text_config(hf_config: dict) -> dict:
    """The decoder's config.json dict: a Qwen2 with `rope_parameters.mrope_section`."""
    text = dict(hf_config.get("text_config") or hf_config)
    text.pop("vision_config", None)
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    section = rope.get("mrope_section")
    if not section:
        raise ValueError("a Qwen2.5-VL config needs rope_parameters.mrope_section")
    theta = rope.get("rope_theta", text.get("rope_theta", 1000000.0))
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": theta,
                               "mrope_section": list(section)}  # fmt: skip
    text.pop("rope_scaling", None)
    text["architectures"] = ["Qwen2ForCausalLM"]
    text["tie_word_embeddings"] = hf_config.get(
        "tie_word_embeddings", text.get("tie_word_embeddings", False)
    )
    return text


def split_qwen_tensors(hf_config: dict, tensors: dict[str, np.ndarray], folder: Path,
                       check_tensors, parts_cls):  # fmt: skip
    """(text config dict, text tensors under decoder names, VisionParts)."""
    config = qwen_vit.QwenVisionConfig.from_hf(hf_config)
    prefix = "model.visual." if any(k.startswith("model.visual.") for k in tensors) else "visual."
    vision = {k: v for k, v in tensors.items() if k.startswith(prefix)}
    check_tensors(qwen_vit.expected_hf_tensors(config, prefix), vision, str(folder))
    text = {}
    for name, value in tensors.items():
        if name.startswith(prefix):
            continue
        if name.startswith("model.language_model."):
            name = "model." + name[len("model.language_model.") :]
        text[name] = value
    image_token_id = hf_config.get("image_token_id")
    if image_token_id is None:
        raise ValueError(f"{folder}: config.json has no image_token_id")
    params = qwen_vit.params_from_hf_tensors(config, vision, prefix)
    parts = parts_cls(config, params, int(image_token_id), ARCHITECTURE, folder)
    return text_config(hf_config), text, parts
