"""The Idefics3 / SmolVLM vision tower: a SigLIP encoder over square tiles, then the pixel
shuffle connector that maps each tile to `tokens_per_tile` rows of the text model's width.

Every tile is a full `image_size` square (the image processor splits and resizes images so),
so all patches are real and attention is plain bidirectional attention over the tile.
Axis letters (docs/glossary.md): B tiles, P patches per tile, C vision width, N heads,
H head dim, F mlp dim, D text model width.
"""

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int  # C
    intermediate_size: int  # F
    num_layers: int
    num_heads: int  # N
    image_size: int  # tile side in pixels
    patch_size: int
    scale_factor: int  # pixel shuffle: scale_factor**2 patches fold into one token
    text_hidden_size: int  # D
    layer_norm_eps: float = 1e-6
    num_channels: int = 3

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of "
                             f"patch_size {self.patch_size}")  # fmt: skip
        if self.patches_per_side % self.scale_factor:
            raise ValueError(f"{self.patches_per_side} patches per side do not fold by "
                             f"scale_factor {self.scale_factor}")  # fmt: skip
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_heads}")  # fmt: skip

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """Text-model rows one tile becomes (HF's `image_seq_len`)."""
        return self.patches_per_side**2 // self.scale_factor**2

    @classmethod
    def from_hf(cls, hf: dict) -> "VisionConfig":
        v, t = hf["vision_config"], hf["text_config"]
        act = v.get("hidden_act", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise ValueError(f"vision hidden_act {act!r} is not supported (gelu_pytorch_tanh)")
        return cls(
            hidden_size=v["hidden_size"],
            intermediate_size=v["intermediate_size"],
            num_layers=v["num_hidden_layers"],
            num_heads=v["num_attention_heads"],
            image_size=v["image_size"],
            patch_size=v["patch_size"],
            scale_factor=hf.get("scale_factor", 2),
            text_hidden_size=t["hidden_size"],
            layer_norm_eps=v.get("layer_norm_eps", 1e-6),
            num_channels=v.get("num_channels", 3),
        )


# name -> (HF name under model.vision_model.encoder.layers.{i}., shape fn)
def layer_specs(c: VisionConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    C, F = c.hidden_size, c.intermediate_size
    specs = {}
    for ours, hf, shape in (
        ("ln1", "layer_norm1", (C,)), ("ln2", "layer_norm2", (C,)),
    ):  # fmt: skip
        specs[f"{ours}_w"], specs[f"{ours}_b"] = (f"{hf}.weight", shape), (f"{hf}.bias", shape)
    for ours, hf, (i, o) in (
        ("q", "self_attn.q_proj", (C, C)), ("k", "self_attn.k_proj", (C, C)),
        ("v", "self_attn.v_proj", (C, C)), ("o", "self_attn.out_proj", (C, C)),
        ("fc1", "mlp.fc1", (C, F)), ("fc2", "mlp.fc2", (F, C)),
    ):  # fmt: skip
        specs[f"{ours}_w"], specs[f"{ours}_b"] = (f"{hf}.weight", (o, i)), (f"{hf}.bias", (o,))
    return specs


def expected_hf_tensors(c: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Every vision tensor an HF Idefics3 / SmolVLM checkpoint holds, with its HF shape."""
    C, p = c.hidden_size, c.patch_size
    expected = {
        "model.vision_model.embeddings.patch_embedding.weight": (C, c.num_channels, p, p),
        "model.vision_model.embeddings.patch_embedding.bias": (C,),
        "model.vision_model.embeddings.position_embedding.weight": (c.patches_per_side**2, C),
        "model.vision_model.post_layernorm.weight": (C,),
        "model.vision_model.post_layernorm.bias": (C,),
        "model.connector.modality_projection.proj.weight": (
            c.text_hidden_size, C * c.scale_factor**2,
        ),
    }  # fmt: skip
    for i in range(c.num_layers):
        for hf, shape in layer_specs(c).values():
            expected[f"model.vision_model.encoder.layers.{i}.{hf}"] = shape
    return expected


def params_from_hf_tensors(c: VisionConfig, tensors: dict[str, np.ndarray]) -> dict:
    """Our parameter tree (numpy, matrices [in, out], layers stacked on a leading axis)."""
    pre = "model.vision_model."
    patch = tensors[pre + "embeddings.patch_embedding.weight"]  # [C, ch, p, p]
    layers = {
        name: np.stack([
            tensors[f"{pre}encoder.layers.{i}.{hf}"].T for i in range(c.num_layers)
        ])
        for name, (hf, _) in layer_specs(c).items()
    }  # fmt: skip
    return {
        # [ch * p * p, C]: a patch flattened channel-major, as the convolution reads it.
        "patch_w": patch.reshape(patch.shape[0], -1).T,
        "patch_b": tensors[pre + "embeddings.patch_embedding.bias"],
        "pos": tensors[pre + "embeddings.position_embedding.weight"],
        "post_w": tensors[pre + "post_layernorm.weight"],
        "post_b": tensors[pre + "post_layernorm.bias"],
        "proj": tensors["model.connector.modality_projection.proj.weight"].T,
        "layers": layers,
    }


def position_ids(c: VisionConfig) -> np.ndarray:
    """i32[P] each patch's position-embedding row. HF buckets fractional patch coordinates
    (for tiles smaller than image_size); on a full tile this computes the same grid in
    float32, the way HF does, so a rounding edge gives the same row."""
    n = c.patches_per_side
    boundaries = np.arange(1 / n, 1.0, 1 / n, dtype=np.float32)
    coords = np.minimum(np.arange(n, dtype=np.float32) * np.float32(1.0 / n), 1.0 - 1e-6)
    bucket = np.searchsorted(boundaries, coords.astype(np.float32), side="right")
    return (bucket[:, None] * n + bucket[None, :]).reshape(-1).astype(np.int32)


def layer_norm(x: jax.Array, w: jax.Array, b: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = ((x32 - mean) ** 2).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps) * w + b).astype(x.dtype)


def encode_tiles(params: dict, pixels: jax.Array, c: VisionConfig) -> jax.Array:
    """pixels f32[B, ch, S, S] (normalized tiles) -> image features [B * tokens_per_tile, D]."""
    B, n, p = pixels.shape[0], c.patches_per_side, c.patch_size
    dtype = params["patch_w"].dtype
    patches = pixels.reshape(B, c.num_channels, n, p, n, p).transpose(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(B, n * n, -1).astype(dtype)  # [B, P, ch*p*p]
    x = patches @ params["patch_w"] + params["patch_b"]  # [B, P, C]
    x = x + params["pos"][jnp.asarray(position_ids(c))]

    def layer(x, lp):
        N, H = c.num_heads, c.hidden_size // c.num_heads
        h = layer_norm(x, lp["ln1_w"], lp["ln1_b"], c.layer_norm_eps)
        q = (h @ lp["q_w"] + lp["q_b"]).reshape(B, -1, N, H)  # [B, P, N, H]
        k = (h @ lp["k_w"] + lp["k_b"]).reshape(B, -1, N, H)
        v = (h @ lp["v_w"] + lp["v_b"]).reshape(B, -1, N, H)
        scores = jnp.einsum("bqnh,bknh->bnqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores * H**-0.5, axis=-1).astype(v.dtype)  # [B, N, P, P]
        attn = jnp.einsum("bnqk,bknh->bqnh", probs, v).reshape(B, -1, N * H)
        x = x + attn @ lp["o_w"] + lp["o_b"]
        h = layer_norm(x, lp["ln2_w"], lp["ln2_b"], c.layer_norm_eps)
        h = jax.nn.gelu(h @ lp["fc1_w"] + lp["fc1_b"], approximate=True)  # [B, P, F]
        return x + h @ lp["fc2_w"] + lp["fc2_b"], None

    x, _ = jax.lax.scan(layer, x, params["layers"])
    x = layer_norm(x, params["post_w"], params["post_b"], c.layer_norm_eps)  # [B, P, C]
    return pixel_shuffle(x, c) @ params["proj"]  # [B * tokens_per_tile, D]


def pixel_shuffle(x: jax.Array, c: VisionConfig) -> jax.Array:
    """[B, P, C] -> [B * P / s^2, C * s^2]: each s x s block of patches becomes one row,
    in HF's order (a block's columns fold first, then its rows)."""
    B, P, C = x.shape
    n, s = c.patches_per_side, c.scale_factor
    x = x.reshape(B, n, n // s, C * s)  # fold s neighbouring columns
    x = x.transpose(0, 2, 1, 3).reshape(B, n // s, n // s, C * s * s)  # fold s rows
    x = x.transpose(0, 2, 1, 3)
    return x.reshape(B * P // (s * s), C * s * s)
