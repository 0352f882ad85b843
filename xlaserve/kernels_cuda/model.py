"""The Llama / Qwen decoder in plain torch: an independent implementation of
`xlaserve.models.transformer` for numerical parity, over the same flat ragged token batch and
the same paged KV cache [L, P, page_size, 2K, H].

Module and parameter names are the Hugging Face ones (`model.layers.0.self_attn.q_proj.weight`
...), so a checked HF tensor dict loads with `load_state_dict(strict=True)`; Linear weights are
HF's [out, in]. Numerics follow the JAX model: RMSNorm in float32 then cast back, half-split
rope with cos/sin from float32 angles, q/k/v biases (Qwen2), per-head q/k RMSNorm before rope
(Qwen3), SwiGLU, tied embeddings, sliding window (Mistral), logits cast to float32.
Axis letters (docs/glossary.md): T tokens, D model, F mlp, V vocab, N q heads, K kv heads,
H head dim, L layers, P pages.
"""

import torch
import torch.nn.functional as F
from torch import nn

from xlaserve.kernels_cuda.attention import AttentionMetadata, resolve_attention, write_and_attend
from xlaserve.models.layers import rope_inv_freq
from xlaserve.models.transformer import TransformerConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotation of x [T, heads, H] by cos, sin f32[T, H/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # [T, heads, H/2]
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)  # [T, 1, H/2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, c: TransformerConfig, attention: str):
        super().__init__()
        self.c, self.attention = c, attention
        D, N, K, H = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = nn.Linear(D, N * H, bias=c.attention_bias)
        self.k_proj = nn.Linear(D, K * H, bias=c.attention_bias)
        self.v_proj = nn.Linear(D, K * H, bias=c.attention_bias)
        self.o_proj = nn.Linear(N * H, D, bias=False)
        if c.qk_norm:
            self.q_norm = RMSNorm(H, c.rms_norm_eps)
            self.k_norm = RMSNorm(H, c.rms_norm_eps)

    def forward(self, h, cos, sin, layer_cache, metadata: AttentionMetadata) -> torch.Tensor:
        c, T = self.c, h.shape[0]
        q = self.q_proj(h).view(T, c.num_heads, c.head_dim)  # [T, N, H]
        k = self.k_proj(h).view(T, c.num_kv_heads, c.head_dim)  # [T, K, H]
        v = self.v_proj(h).view(T, c.num_kv_heads, c.head_dim)  # [T, K, H]
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_kv = torch.stack([k, v], dim=2).view(T, 2 * c.num_kv_heads, c.head_dim)  # [T, 2K, H]
        out = write_and_attend(
            q,
            new_kv,
            layer_cache,
            metadata,
            sm_scale=c.head_dim**-0.5,
            sliding_window=c.sliding_window,
            impl=self.attention,
        )  # [T, N, H]
        return self.o_proj(out.reshape(T, c.num_heads * c.head_dim))  # [T, D]


class MLP(nn.Module):
    def __init__(self, c: TransformerConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # [T, F] -> [T, D]


class DecoderLayer(nn.Module):
    def __init__(self, c: TransformerConfig, attention: str):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c, attention)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, layer_cache, metadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer_cache, metadata)
        return x + self.mlp(self.post_attention_layernorm(x))  # [T, D]


class Decoder(nn.Module):
    """HF's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, c: TransformerConfig, attention: str):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c, attention) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class TorchTransformer(nn.Module):
    """Decoder-only LM over a flat ragged token batch and a paged KV cache.

    Build it empty on the meta device and load HF tensors with
    `load_state_dict(tensors, strict=True, assign=True)` (see `loader.load_torch_model`).
    attention: "reference" or "triton" (resolve "auto" with `attention.resolve_attention`).
    """

    def __init__(self, config: TransformerConfig, *, attention: str = "reference"):
        super().__init__()
        self.config = config
        self.model = Decoder(config, attention)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        inv_freq = rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        # Built on the CPU even under a meta-device context; float32 whatever the weights' dtype.
        inv_freq = torch.tensor(inv_freq, dtype=torch.float32, device="cpu")  # [H/2]
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @property
    def attention(self) -> str:
        return self.model.layers[0].self_attn.attention

    def set_attention(self, impl: str) -> None:
        """Switches every layer to `impl` (resolved for the parameters' device)."""
        impl = resolve_attention(impl, self.model.embed_tokens.weight.device)
        for layer in self.model.layers:
            layer.self_attn.attention = impl

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, positions: int[T]; kv_cache: [L, P, page_size, 2K, H] (written in place).

        Returns (kv_cache, final-normed hidden states [T, D]).
        """
        x = self.model.embed_tokens(input_ids)  # [T, D]
        angles = positions.float()[:, None] * self.inv_freq[None, :]  # [T, H/2] float32
        cos, sin = angles.cos(), angles.sin()
        for layer, layer_cache in zip(self.model.layers, kv_cache, strict=True):
            x = layer(x, cos, sin, layer_cache, metadata)  # layer_cache: [P, ps, 2K, H] view
        return kv_cache, self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits f32[S, V] for the selected hidden rows [S, D]."""
        head = self.model.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        return F.linear(hidden, head.weight).float()
