"""Qwen2.5-VL prompts: text + images -> token ids and `ImageItem`s.

transformers' `Qwen2VLImageProcessorPil` resizes, normalises and flattens each image into
patches (merge-block-major) with its patch grid; each `<|image_pad|>` (the chat template
writes `<|vision_start|><|image_pad|><|vision_end|>`) is expanded by
`Qwen2_5_VLProcessor.replace_image_token`, transformers' own expansion (the processor class
itself wants a video processor, hence torchvision, so it is not built).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from xlaserve.multimodal.inputs import ImageItem
from xlaserve.multimodal.processor import ImageLimits, check_counts, load_image

IMAGE_TOKEN = "<|image_pad|>"


class QwenImageProcessor:
    """The model's processor for one engine (runs on the intake's thread)."""

    def __init__(self, folder: Path, tokenizer, image_token_id: int, limits: ImageLimits):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        self.limits = limits
        self.tokenizer = tokenizer
        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(folder))
        self.image_token = IMAGE_TOKEN
        self.image_token_id = image_token_id
        if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != image_token_id:
            raise ValueError(f"the tokenizer's {IMAGE_TOKEN} is id "
                             f"{tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}, the model's "
                             f"image_token_id is {image_token_id}")  # fmt: skip
        self.merge = self.image_processor.merge_size
        settings = repr(sorted(self.image_processor.to_dict().items())).encode()
        self._salt = hashlib.sha256(settings).digest()

    def expand(self, text: str, grids: np.ndarray) -> str:
        """The prompt with each placeholder expanded (transformers' expansion)."""
        from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor

        shim = SimpleNamespace(image_processor=self.image_processor, image_token=IMAGE_TOKEN)
        pieces = text.split(IMAGE_TOKEN)
        out = pieces[0]
        for i, piece in enumerate(pieces[1:]):
            inputs = {"image_grid_thw": grids}
            out += Qwen2_5_VLProcessor.replace_image_token(shim, inputs, i) + piece
        return out

    def process(
        self, text: str, images: Sequence[object], *, add_special_tokens: bool
    ) -> tuple[list[int], tuple[ImageItem, ...]]:
        check_counts(text, images, IMAGE_TOKEN, self.limits)
        if not images:
            ids = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
            return list(ids), ()
        decoded = [load_image(im, i, self.limits) for i, im in enumerate(images)]
        out = self.image_processor(images=decoded, return_tensors="np")
        patches = np.asarray(out["pixel_values"], np.float32)  # [sum P, patch]
        grids = np.asarray(out["image_grid_thw"]).astype(np.int64)  # [images, 3]
        ids = self.tokenizer(self.expand(text, grids),
                             add_special_tokens=add_special_tokens)["input_ids"]  # fmt: skip
        positions = np.flatnonzero(np.asarray(ids) == self.image_token_id).astype(np.int32)
        items, first_patch, first_token = [], 0, 0
        for t, h, w in grids.tolist():
            n_patches, n_tokens = t * h * w, t * h * w // self.merge**2
            pixels = np.ascontiguousarray(patches[first_patch : first_patch + n_patches])
            key = hashlib.sha256(self._salt + repr((t, h, w)).encode() + pixels.tobytes())
            run = positions[first_token : first_token + n_tokens]
            assert len(run) == n_tokens and run[-1] - run[0] == n_tokens - 1, "layout"
            items.append(ImageItem(key.digest(), run, pixels, 1,
                                   (t, h // self.merge, w // self.merge)))  # fmt: skip
            first_patch += n_patches
            first_token += n_tokens
        assert first_token == len(positions), "one run of placeholders per image"
        return list(ids), tuple(items)
