"""Vision-language checkpoints built here (no VLM weights can be installed): HF folders of
SmolVLM / Idefics3 with random (seeded) weights, the SmolLM2 tokenizer plus the image tokens,
and the PIL image processor with small tiles."""

import numpy as np
import PIL.Image
import pytest
import torch

from tests.conftest import TEST_TOKEN_BUCKETS
from xlaserve.checkpoints.presets import resolve_bundled
from xlaserve.checkpoints.tokenizer import load_tokenizer
from xlaserve.multimodal.synthetic import CHAT_TEMPLATE, IMAGE_TOKENS

# SmolVLM's image tokens and chat template (image parts become <image>, which the processor
# expands) are the ones the benchmark checkpoints use.
TILE = 32  # pixels per tile side (max_image_size); images up to 2 x 2 tiles + the global one


def image(width: int, height: int, seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def vlm_tokenizer():
    tok = load_tokenizer(resolve_bundled("smollm2-135m-instruct"))
    tok.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def vision_config(hidden: int = 32, layers: int = 2) -> dict:
    return dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, image_size=TILE, patch_size=8)  # fmt: skip


def save_vlm(folder, hf_model, tokenizer, arch: str) -> None:
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor(arch).save_pretrained(folder)


def image_processor(arch: str):
    from xlaserve.multimodal.processor import image_processor_class

    cls = image_processor_class(arch)
    return cls(size={"longest_edge": 2 * TILE}, max_image_size={"longest_edge": TILE})


def tiny_vlm(arch: str, tokenizer, seed: int = 0, text_config: dict | None = None):
    """A random-weight HF model of `arch` (SmolVLM or Idefics3) over the tokenizer's vocab."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
    )

    text = text_config or dict(
        model_type="llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        rms_norm_eps=1e-5, max_position_embeddings=2048, tie_word_embeddings=False,
        eos_token_id=2, bos_token_id=1,
    )  # fmt: skip
    config_cls, model_cls = {
        "SmolVLMForConditionalGeneration": (SmolVLMConfig, SmolVLMForConditionalGeneration),
        "Idefics3ForConditionalGeneration": (Idefics3Config, Idefics3ForConditionalGeneration),
    }[arch]
    config = config_cls(vision_config=vision_config(), text_config=text, scale_factor=2,
                        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                        tie_word_embeddings=text.get("tie_word_embeddings", False))  # fmt: skip
    torch.manual_seed(seed)
    return model_cls(config).eval()


@pytest.fixture(scope="session")
def smolvlm_folder(tmp_path_factory, vlm_tokenizer):
    folder = tmp_path_factory.mktemp("smolvlm-tiny")
    arch = "SmolVLMForConditionalGeneration"
    hf_model = tiny_vlm(arch, vlm_tokenizer)
    save_vlm(folder, hf_model, vlm_tokenizer, arch)
    return folder, hf_model


@pytest.fixture(scope="session")
def tiny_llm(smolvlm_folder, tmp_path_factory):
    """One engine for the engine and serving tests (a warm-up is most of their time).

    A 32-token budget splits every image prompt into chunks, most inside an image's tokens;
    24 encoder feature rows per step: at most one 5-tile image (20 rows) starts per step.
    file:// images are allowed under `llm.media_folder`."""
    from xlaserve import LLM

    folder, _ = smolvlm_folder
    media = tmp_path_factory.mktemp("media")
    llm = LLM(str(folder), dtype="float32", max_model_len=256, max_num_seqs=4,
              max_num_batched_tokens=32, max_encoder_features_per_step=24,
              compilation_cache_dir=None, limit_mm_per_prompt=2, max_image_pixels=10**6,
              allowed_local_media_path=str(media),
              token_buckets=TEST_TOKEN_BUCKETS)  # fmt: skip
    llm.media_folder = media
    return llm
