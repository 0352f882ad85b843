"""Prompt text + images -> token ids with expanded placeholders and `ImageItem`s, by the
model's own transformers processor (its image processor splits, resizes and normalises; its
`replace_image_token` expands each `<image>`), so the layout is exactly the processor's.

Idefics3 and SmolVLM share the expansion (fake-token, row/col tags, `image_seq_len` image
tokens per tile, then the global tile); SmolVLM's own processor class needs a video
processor (torchvision), so both use `Idefics3Processor` around the checkpoint's image
processor class (the PIL implementation).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image

from xlaserve.errors import InvalidRequestError
from xlaserve.multimodal.inputs import ImageItem

PARAM = "multi_modal_data"
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


@dataclass(frozen=True)
class ImageLimits:
    max_images: int = 4  # limit_mm_per_prompt
    max_pixels: int = 4096 * 4096  # an image's width * height at most


def load_image(image: object, index: int, limits: ImageLimits) -> PIL.Image.Image:
    """A decoded RGB image from a PIL image or encoded bytes; corrupt, truncated, unsupported
    or oversized images are refused naming the image."""
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        try:
            with PIL.Image.open(io.BytesIO(data)) as probe:
                fmt = probe.format
                probe.verify()
            image = PIL.Image.open(io.BytesIO(data))
            if fmt not in IMAGE_FORMATS:
                raise InvalidRequestError(PARAM, f"image {index}: format {fmt} is not "
                                          f"supported; use one of {IMAGE_FORMATS}")  # fmt: skip
            check_pixels(image.size, index, limits)
            image.load()  # decodes fully: a truncated file fails here
        except InvalidRequestError:
            raise
        except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
            raise InvalidRequestError(PARAM, f"image {index} cannot be decoded "
                                      f"({len(data)} bytes): {e}") from None  # fmt: skip
    elif not isinstance(image, PIL.Image.Image):
        raise InvalidRequestError(PARAM, f"image {index} must be a PIL image or encoded "
                                  f"bytes, got {type(image).__name__}")  # fmt: skip
    check_pixels(image.size, index, limits)
    return image.convert("RGB")


def check_counts(text: str, images: Sequence[object], image_token: str,
                 limits: ImageLimits) -> None:  # fmt: skip
    """Refuses more images than the limit, or a placeholder count that does not match."""
    if len(images) > limits.max_images:
        raise InvalidRequestError(PARAM, f"{len(images)} images in one prompt; the limit "
                                  f"is {limits.max_images} (limit_mm_per_prompt)")  # fmt: skip
    found = text.count(image_token)
    if found != len(images):
        raise InvalidRequestError(PARAM, f"the prompt has {found} {image_token} "
                                  f"placeholder(s) for {len(images)} image(s)")  # fmt: skip


def check_pixels(size: tuple[int, int], index: int, limits: ImageLimits) -> None:
    w, h = size
    if w < 1 or h < 1 or w * h > limits.max_pixels:
        raise InvalidRequestError(PARAM, f"image {index} is {w}x{h} = {w * h} pixels; the "
                                  f"limit is {limits.max_pixels} pixels")  # fmt: skip


class ImageProcessor:
    """The model's processor for one engine (not thread-safe: runs on the intake's thread)."""

    def __init__(self, folder: Path, tokenizer, image_token_id: int, tokens_per_tile: int,
                 architecture: str, limits: ImageLimits):  # fmt: skip
        from transformers.models.idefics3.processing_idefics3 import Idefics3Processor

        self.limits = limits
        self.image_processor = image_processor_class(architecture).from_pretrained(str(folder))
        self.processor = Idefics3Processor(self.image_processor, tokenizer,
                                           image_seq_len=tokens_per_tile)  # fmt: skip
        self.image_token = self.processor.image_token
        self.image_token_id = image_token_id
        if tokenizer.convert_tokens_to_ids(self.image_token) != image_token_id:
            raise ValueError(f"the tokenizer's {self.image_token} is id "
                             f"{tokenizer.convert_tokens_to_ids(self.image_token)}, the model's "
                             f"image_token_id is {image_token_id}")  # fmt: skip
        self.global_token_id = tokenizer.convert_tokens_to_ids(self.processor.global_image_tag)
        self.tokens_per_tile = tokens_per_tile
        settings = repr(sorted(self.image_processor.to_dict().items())).encode()
        self._salt = hashlib.sha256(settings).digest()

    def process(
        self, text: str, images: Sequence[object], *, add_special_tokens: bool
    ) -> tuple[list[int], tuple[ImageItem, ...]]:
        """(token ids, images) of a prompt whose text holds one `<image>` per image."""
        limits = self.limits
        check_counts(text, images, self.image_token, limits)
        if not images:
            ids = self.processor.tokenizer(text, add_special_tokens=add_special_tokens)
            return list(ids["input_ids"]), ()
        decoded = [load_image(im, i, limits) for i, im in enumerate(images)]
        out = self.processor(text=[text], images=[decoded], return_tensors="np",
                             add_special_tokens=add_special_tokens)  # fmt: skip
        ids = np.asarray(out["input_ids"][0])
        tiles = np.asarray(out["pixel_values"][0], np.float32)  # [tiles, ch, S, S]
        return ids.tolist(), self._items(ids, tiles, len(decoded))

    def _items(self, ids: np.ndarray, tiles: np.ndarray, num_images: int) -> tuple:
        """Each image's placeholder positions and tiles: runs of `tokens_per_tile` image
        tokens, one per tile; the run after the global-image tag closes an image."""
        positions = np.flatnonzero(ids == self.image_token_id).astype(np.int32)
        n = self.tokens_per_tile
        assert len(positions) % n == 0 and len(positions) // n == len(tiles), "layout"
        items, first_tile = [], 0
        for t in range(len(tiles)):
            run = positions[t * n : (t + 1) * n]
            assert run[-1] - run[0] == n - 1, "a tile's image tokens are contiguous"
            if ids[run[0] - 1] != self.global_token_id:
                continue
            pixels = np.ascontiguousarray(tiles[first_tile : t + 1])
            key = hashlib.sha256(self._salt + pixels.tobytes()).digest()
            items.append(ImageItem(key, positions[first_tile * n : (t + 1) * n], pixels,
                                   t + 1 - first_tile))  # fmt: skip
            first_tile = t + 1
        assert len(items) == num_images and first_tile == len(tiles), "one global tile per image"
        return tuple(items)


def image_processor_class(architecture: str):
    if architecture == "SmolVLMForConditionalGeneration":
        from transformers.models.smolvlm.image_processing_pil_smolvlm import (
            SmolVLMImageProcessorPil,
        )

        return SmolVLMImageProcessorPil
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    return Idefics3ImageProcessorPil
