"""The runner's vision encoder and the intake's image processor for a loaded
vision-language model, from the engine options."""

from __future__ import annotations

from xlaserve.multimodal.encoder import VisionEncoder
from xlaserve.multimodal.loader import VisionParts
from xlaserve.multimodal.processor import ImageLimits, ImageProcessor


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
    processor = ImageProcessor(
        parts.folder, tokenizer, parts.image_token_id, parts.config.tokens_per_tile,
        parts.architecture, limits,
    )  # fmt: skip
    encoder = VisionEncoder(
        parts.config, parts.params, dtype, max_tiles=max_tiles_per_image(processor.image_processor)
    )
    return encoder, processor
