"""The Qwen2.5-VL vision tower on the device: one image per call, its patches padded to the
smallest patch-count bucket that holds them (powers of two, compiled at warm-up), so no image
size compiles anything later. Shares the encoder cache and the placement merge of
`VisionEncoder`."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.models.qwen_vit import QwenVisionConfig, encode_patches, patch_layout
from xlaserve.multimodal.encoder import VisionEncoder
from xlaserve.multimodal.inputs import ImageItem


def patch_buckets(min_patches: int, max_patches: int, merge_unit: int) -> tuple[int, ...]:
    """Powers of two from the smallest image's patches up to the first >= the largest's
    (each a multiple of the merge unit)."""
    first = max(merge_unit, 1 << (max(min_patches, 1) - 1).bit_length())
    buckets = [first]
    while buckets[-1] < max_patches:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets)


class QwenVisionEncoder(VisionEncoder):
    """The vision tower's patch-bucket graphs; the cache and merge are VisionEncoder's."""

    bucket_kind = "vision patches"

    def __init__(self, config: QwenVisionConfig, params: dict, dtype, *, min_patches: int,
                 max_patches: int, cache_features: int = 1 << 16):  # fmt: skip
        self.config = config
        self.params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
        self.buckets = patch_buckets(min_patches, max_patches, config.merge_unit)
        self.graph = jax.jit(partial(encode_patches, c=config))
        self._start_cache(cache_features)

    def bucket_features(self, bucket: int) -> int:
        return bucket // self.config.merge_unit

    def _inputs(self, patches: np.ndarray, grid: tuple[int, int, int], bucket: int) -> tuple:
        layout = patch_layout(self.config, grid, bucket)
        padded = np.zeros((bucket, self.config.patch_width), np.float32)
        padded[: len(patches)] = patches
        return padded, layout.rope_hw, layout.window, layout.image

    def warmup_graphs(self) -> list:
        m = self.config.spatial_merge_size
        return [
            (f"vision encoder patches={b}",
             partial(self._run, *self._inputs(np.zeros((0, 1)), (1, m, m), b)))
            for b in self.buckets
        ]  # fmt: skip

    def encode_item(self, item: ImageItem) -> np.ndarray:
        m = self.config.spatial_merge_size
        t, h, w = item.grid
        grid = (t, h * m, w * m)
        n = t * h * w * m * m
        if n > self.buckets[-1]:
            raise ValueError(f"an image of {n} patches exceeds the largest encoder bucket "
                             f"({self.buckets[-1]} patches)")  # fmt: skip
        bucket = next(b for b in self.buckets if b >= n)
        feats = self._run(*self._inputs(item.pixels, grid, bucket))
        return np.asarray(feats, np.float32)[: n // self.config.merge_unit]
