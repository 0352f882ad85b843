"""The runner's vision encoder and the intake's image processor for a loaded
vision-language model, from the engine options."""

from __future__ import annotations

from xlaserve.multimodal.encoder import VisionEncoder
from xlaserve.multimodal.loader import VisionParts
from xlaserve.multimodal.processor import ImageLimits, ImageProcessor
from xlaserve.multimodal.qwen_loader import ARCHITECTURE as QWEN_ARCHITECTURE


def max_tiles_per_image(image_processor) -> int:
    """Tiles of the largest image the processor makes: a k x k split plus the global tile."""
    if not getattr(image_processor, "do_image_splitting", True):
        return 1
    longest = image_processor.size["longest_edge"]
    tile = image_processor.max_image_size["longest_edge"]
    k = -(-longest // tile)
    return k * k + 1


def build_multimodal(
    parts: VisionParts, tokenizer, dtype, args
) -> tuple[VisionEncoder, ImageProcessor]:
    if tokenizer is None:
        raise ValueError(f"{parts.folder}: a vision-language model needs its tokenizer files")
    limits = ImageLimits(max_images=args.limit_mm_per_prompt, max_pixels=args.max_image_pixels)
    if parts.architecture == QWEN_ARCHITECTURE:
        return build_qwen(parts, tokenizer, dtype, limits)
    processor = ImageProcessor(
        parts.folder, tokenizer, parts.image_token_id, parts.config.tokens_per_tile,
        parts.architecture, limits,
    )  # fmt: skip
    encoder = VisionEncoder(
        parts.config, parts.params, dtype, max_tiles=max_tiles_per_image(processor.image_processor)
    )
    return encoder, processor


def build_qwen(parts: VisionParts, tokenizer, dtype, limits: ImageLimits):
    """Qwen2.5-VL: patch-count buckets from the image processor's pixel range."""
    from xlaserve.multimodal.qwen_encoder import QwenVisionEncoder
    from xlaserve.multimodal.qwen_processor import QwenImageProcessor

    processor = QwenImageProcessor(parts.folder, tokenizer, parts.image_token_id, limits)
    size = processor.image_processor.size
    patch_pixels = parts.config.patch_size**2
    encoder = QwenVisionEncoder(
        parts.config, parts.params, dtype, min_patches=size["shortest_edge"] // patch_pixels,
        max_patches=size["longest_edge"] // patch_pixels,
    )  # fmt: skip
    return encoder, processor
