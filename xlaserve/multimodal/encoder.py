"""The vision tower on the device: one jitted graph per tile bucket (compiled at warm-up), and
an encoder cache of image features keyed by the image's content hash.

Images are encoded tile-batched: an image of n tiles runs in the smallest bucket >= n (padding
tiles are zeros whose features are dropped), larger ones in chunks of the largest bucket, so
no image size compiles anything after warm-up.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.models.siglip import VisionConfig, encode_tiles
from xlaserve.multimodal.inputs import ImageItem
from xlaserve.multimodal.placement import ImagePlacement

logger = logging.getLogger(__name__)


def tile_buckets(max_tiles: int) -> tuple[int, ...]:
    """Powers of two up to the first >= max_tiles (the tiles of the largest image)."""
    buckets = [1]
    while buckets[-1] < max_tiles:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets)


class VisionEncoder:
    """Vision tower parameters, its bucketed graphs and the encoder cache (host features)."""

    bucket_kind = "vision tiles"  # what a bucket counts (the bucket sweep's rows)

    def __init__(self, config: VisionConfig, params: dict, dtype, *, max_tiles: int,
                 cache_features: int = 1 << 16):  # fmt: skip
        self.config = config
        self.params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
        self.buckets = tile_buckets(max_tiles)
        self.graph = jax.jit(partial(encode_tiles, c=config))
        self._start_cache(cache_features)

    def _start_cache(self, cache_features: int) -> None:
        self.cache_features = cache_features  # feature rows the cache keeps at most
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._cached_rows = 0
        self.hits = self.misses = 0

    @property
    def width(self) -> int:
        return self.config.text_hidden_size

    def warmup_graphs(self) -> list:
        """(name, call) per tile bucket, for the runner's warm-up."""
        c = self.config
        return [
            (f"vision encoder tiles={b}", partial(self._run, np.zeros(
                (b, c.num_channels, c.image_size, c.image_size), np.float32)))
            for b in self.buckets
        ]  # fmt: skip

    def _run(self, *inputs: np.ndarray) -> jax.Array:
        return self.graph(self.params, *inputs)

    def features(self, item: ImageItem) -> np.ndarray:
        """f32[F, D] the image's features (from the cache, or encoded now)."""
        found = self._cache.get(item.key)
        if found is not None:
            self.hits += 1
            self._cache.move_to_end(item.key)
            return found
        self.misses += 1
        out = self.encode_item(item)
        self._cache[item.key] = out
        self._cached_rows += len(out)
        while self._cached_rows > self.cache_features and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_rows -= len(old)
        return out

    def bucket_features(self, bucket: int) -> int:
        """Feature rows a graph of `bucket` makes (the bucket sweep's throughput)."""
        return bucket * self.config.tokens_per_tile

    def encode_item(self, item: ImageItem) -> np.ndarray:
        return self.encode(item.pixels)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """Features f32[tiles * tokens_per_tile, D] of tiles f32[tiles, ch, S, S]."""
        per_tile, largest = self.config.tokens_per_tile, self.buckets[-1]
        outs = []
        for first in range(0, len(pixels), largest):
            part = pixels[first : first + largest]
            bucket = next(b for b in self.buckets if b >= len(part))
            padded = np.zeros((bucket, *part.shape[1:]), np.float32)
            padded[: len(part)] = part
            feats = np.asarray(self._run(padded), np.float32)
            outs.append(feats[: len(part) * per_tile])
        return np.concatenate(outs)

    def merge_inputs(self, placements: list[ImagePlacement], num_tokens: int):
        """(embeddings f32[T, D], mask bool[T]) the forward puts at placeholder rows."""
        embeds = np.zeros((num_tokens, self.width), np.float32)
        mask = np.zeros(num_tokens, np.bool_)
        for p in placements:
            embeds[p.step_rows] = self.features(p.item)[p.feature_rows]
            mask[p.step_rows] = True
        return embeds, mask
