"""The Qwen2.5-VL vision tower: a ViT over an image's patches (each a temporal_patch_size x
patch x patch cube, as the image processor flattens it) with 2D rotary embeddings, windowed
attention in most layers and full attention in `fullatt_block_indexes`, RMSNorm, a SwiGLU MLP,
then the 2x2 patch merger to the text model's width.

One image at a time, padded to a patch-count bucket: attention is dense and masked by segment
(a window id or the image), so neither the window permutation nor its inverse is needed (the
processor already lays patches out merge-block-major, the merger's grouping).
Axis letters: P patches, C vision width, N heads, H head dim, F mlp dim, D text width.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.models.layers import apply_rope, rms_norm

PAD_SEGMENT = -1


@dataclass(frozen=True)
class QwenVisionConfig:
    hidden_size: int  # C
    intermediate_size: int  # F
    num_layers: int
    num_heads: int  # N
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    window_size: int  # pixels
    fullatt_block_indexes: tuple[int, ...]
    text_hidden_size: int  # D
    rope_theta: float = 10000.0
    num_channels: int = 3
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_width(self) -> int:
        """Values in one flattened patch."""
        return self.num_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @classmethod
    def from_hf(cls, hf: dict) -> "QwenVisionConfig":
        v, t = hf["vision_config"], hf.get("text_config") or hf
        act = v.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"vision hidden_act {act!r} is not supported (silu)")
        rope = v.get("rope_parameters") or {}
        return cls(
            hidden_size=v["hidden_size"],
            intermediate_size=v["intermediate_size"],
            num_layers=v["depth"],
            num_heads=v["num_heads"],
            patch_size=v.get("patch_size", 14),
            temporal_patch_size=v.get("temporal_patch_size", 2),
            spatial_merge_size=v.get("spatial_merge_size", 2),
            window_size=v.get("window_size", 112),
            fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))),
            text_hidden_size=v.get("out_hidden_size", t["hidden_size"]),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            num_channels=v.get("in_channels", 3),
        )


def _layer_hf_names(c: QwenVisionConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """ours -> (HF name under model.visual.blocks.{i}., HF shape)."""
    C, F = c.hidden_size, c.intermediate_size
    return {
        "norm1": ("norm1.weight", (C,)), "norm2": ("norm2.weight", (C,)),
        "qkv_w": ("attn.qkv.weight", (3 * C, C)), "qkv_b": ("attn.qkv.bias", (3 * C,)),
        "proj_w": ("attn.proj.weight", (C, C)), "proj_b": ("attn.proj.bias", (C,)),
        "gate_w": ("mlp.gate_proj.weight", (F, C)), "gate_b": ("mlp.gate_proj.bias", (F,)),
        "up_w": ("mlp.up_proj.weight", (F, C)), "up_b": ("mlp.up_proj.bias", (F,)),
        "down_w": ("mlp.down_proj.weight", (C, F)), "down_b": ("mlp.down_proj.bias", (C,)),
    }  # fmt: skip


def expected_hf_tensors(c: QwenVisionConfig, prefix: str = "model.visual.") -> dict:
    """Every vision tensor an HF Qwen2.5-VL checkpoint holds, with its HF shape."""
    C, M = c.hidden_size, c.hidden_size * c.merge_unit
    p, tp = c.patch_size, c.temporal_patch_size
    expected = {
        f"{prefix}patch_embed.proj.weight": (C, c.num_channels, tp, p, p),
        f"{prefix}merger.ln_q.weight": (C,),
        f"{prefix}merger.mlp.0.weight": (M, M), f"{prefix}merger.mlp.0.bias": (M,),
        f"{prefix}merger.mlp.2.weight": (c.text_hidden_size, M),
        f"{prefix}merger.mlp.2.bias": (c.text_hidden_size,),
    }  # fmt: skip
    for i in range(c.num_layers):
        for hf, shape in _layer_hf_names(c).values():
            expected[f"{prefix}blocks.{i}.{hf}"] = shape
    return expected


def params_from_hf_tensors(c: QwenVisionConfig, tensors: dict, prefix: str = "model.visual."):
    """Our parameter tree (numpy; matrices [in, out]; layers stacked on a leading axis)."""

    def ours(name, value):
        return value.T if value.ndim == 2 else value

    layers = {
        name: np.stack([ours(name, tensors[f"{prefix}blocks.{i}.{hf}"])
                        for i in range(c.num_layers)])
        for name, (hf, _) in _layer_hf_names(c).items()
    }  # fmt: skip
    patch = tensors[f"{prefix}patch_embed.proj.weight"]  # [C, ch, tp, p, p]
    return {
        "patch_w": patch.reshape(patch.shape[0], -1).T,  # [ch*tp*p*p, C], the processor's order
        "merge_norm": tensors[f"{prefix}merger.ln_q.weight"],
        "merge_w1": tensors[f"{prefix}merger.mlp.0.weight"].T,
        "merge_b1": tensors[f"{prefix}merger.mlp.0.bias"],
        "merge_w2": tensors[f"{prefix}merger.mlp.2.weight"].T,
        "merge_b2": tensors[f"{prefix}merger.mlp.2.bias"],
        "layers": layers,
    }


@dataclass(frozen=True)
class PatchLayout:
    """Host-computed per-patch inputs of one image's graph, padded to a bucket of P rows."""

    rope_hw: np.ndarray  # i32[P, 2] each patch's (row, column) in the patch grid
    window: np.ndarray  # i32[P] the patch's attention window (PAD_SEGMENT for padding)
    image: np.ndarray  # i32[P] 0 for the image's patches, PAD_SEGMENT for padding


def patch_layout(c: QwenVisionConfig, grid: tuple[int, int, int], bucket: int) -> PatchLayout:
    """The layout of an image of `grid` (t, h, w) patches, padded to `bucket` patches.

    Patches come merge-block-major (the processor's order): merge unit u = (t, bh, bw) holds
    the m x m patches of block (bh, bw) row-major. Windows are squares of
    window_size // patch_size // m merge units, per frame."""
    t, h, w = grid
    m = c.spatial_merge_size
    bh, bw = np.meshgrid(np.arange(h // m), np.arange(w // m), indexing="ij")  # merge units
    ih, iw = np.meshgrid(np.arange(m), np.arange(m), indexing="ij")  # inside a unit
    rows = (bh[:, :, None, None] * m + ih[None, None]).reshape(-1)
    cols = (bw[:, :, None, None] * m + iw[None, None]).reshape(-1)
    units = c.window_size // m // c.patch_size
    wins_w = -(-(w // m) // units)
    win = ((bh // units) * wins_w + bw // units)[:, :, None, None]
    win = np.broadcast_to(win, (h // m, w // m, m, m)).reshape(-1)
    frames = np.arange(t)[:, None]
    per_frame = (win.max() + 1) if win.size else 1
    n = t * h * w
    if n > bucket:
        raise ValueError(f"{n} patches exceed the bucket of {bucket}")
    rope_hw = np.zeros((bucket, 2), np.int32)
    rope_hw[:n] = np.stack([np.tile(rows, t), np.tile(cols, t)], -1)
    window = np.full(bucket, PAD_SEGMENT, np.int32)
    window[:n] = (frames * per_frame + win[None]).reshape(-1)
    image = np.full(bucket, PAD_SEGMENT, np.int32)
    image[:n] = 0
    return PatchLayout(rope_hw, window, image)


def vision_inv_freq(c: QwenVisionConfig) -> np.ndarray:
    """f32[H // 4]: the axial rope's frequencies (shared by the row and column halves)."""
    half = c.head_dim // 2
    return (1.0 / c.rope_theta ** (np.arange(0, half, 2, dtype=np.float32) / half)).astype(
        np.float32
    )


def encode_patches(params: dict, patches, rope_hw, window, image, c: QwenVisionConfig):
    """patches f32[P, patch_width] (one image, padded) -> features [P / merge_unit, D]."""
    P, N, H = patches.shape[0], c.num_heads, c.head_dim
    dtype = params["patch_w"].dtype
    x = patches.astype(dtype) @ params["patch_w"]  # [P, C]
    inv = jnp.asarray(vision_inv_freq(c))
    angles = jnp.concatenate(
        [rope_hw[:, :1].astype(jnp.float32) * inv, rope_hw[:, 1:].astype(jnp.float32) * inv], -1
    )  # [P, H/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    same_window = (window[:, None] == window[None, :])[None]  # [1, P, P]
    same_image = (image[:, None] == image[None, :])[None]
    full = np.zeros(c.num_layers, np.bool_)
    full[list(c.fullatt_block_indexes)] = True

    def layer(x, inputs):
        lp, is_full = inputs
        h = rms_norm(x, lp["norm1"], c.eps)
        qkv = (h @ lp["qkv_w"] + lp["qkv_b"]).reshape(P, 3, N, H)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [P, N, H]
        q = apply_rope(q.astype(jnp.float32), cos, sin).astype(dtype)
        k = apply_rope(k.astype(jnp.float32), cos, sin).astype(dtype)
        scores = jnp.einsum("qnh,knh->nqk", q, k, preferred_element_type=jnp.float32) * H**-0.5
        mask = jnp.where(is_full, same_image, same_window)
        scores = jnp.where(mask, scores, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)  # [N, P, P]
        attn = jnp.einsum("nqk,knh->qnh", probs, v).reshape(P, N * H)
        x = x + attn @ lp["proj_w"] + lp["proj_b"]
        h = rms_norm(x, lp["norm2"], c.eps)
        gate = jax.nn.silu(h @ lp["gate_w"] + lp["gate_b"])
        return x + (gate * (h @ lp["up_w"] + lp["up_b"])) @ lp["down_w"] + lp["down_b"], None

    x, _ = jax.lax.scan(layer, x, (params["layers"], jnp.asarray(full)))
    x = rms_norm(x, params["merge_norm"], c.eps).reshape(P // c.merge_unit, -1)
    x = jax.nn.gelu(x @ params["merge_w1"] + params["merge_b1"], approximate=False)
    return x @ params["merge_w2"] + params["merge_b2"]  # [P / merge_unit, D]
