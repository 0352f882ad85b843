"""EAGLE / EAGLE-3 heads: loading a head folder and the proposer that drafts with it.

A head folder holds `config.json` (Llama-style sizes; EAGLE-3 adds `draft_vocab_size` and
optionally `eagle_config.eagle_aux_hidden_state_layer_ids`) and its weights
(`*.safetensors` or `pytorch_model.bin`): EAGLE-1 `fc.weight` [D, 2D] (+ `fc.bias`),
`layers.0.*`; EAGLE-3 `fc.weight` [D, 3D], `midlayer.*` with `hidden_norm`, `norm.weight`,
`lm_head.weight` [draft vocab, D] and `d2t`. An `embed_tokens.weight` is used when present,
else the target's embedding. Every tensor's shape is checked against the target at start-up.

Every step, after verification, the head runs over the step's positions with each position's
*next* committed token and the target's feature there ("pass 1"), which keeps its one-layer
cache in step; for the sequences drafting, the output at their last committed position gives
the first draft, and k - 1 more head steps (on its own outputs) give the rest, in one device
call. A position's head K/V depends on the token after it, so a prefix-cache hit can leave the
last hit position's entry from another continuation: that only lowers acceptance, never
changes outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xlaserve.engine.input_batch import InputBatch, PreparedStep
from xlaserve.engine.runner_api import KVCacheSpec, LoadedForRunner, RunnerConfig
from xlaserve.engine.sampler import first_argmax
from xlaserve.models import eagle
from xlaserve.models.attention import AttentionMetadata
from xlaserve.models.layers import linear, rms_norm
from xlaserve.models.llama import rope_settings
from xlaserve.spec_decode.config import SpeculativeConfig
from xlaserve.spec_decode.draft_rows import empty_rows, one_token_metadata

LAYER_NAMES = {  # HF name (after the layer prefix) -> ours
    "input_layernorm.weight": "attn_norm",
    "hidden_norm.weight": "hidden_norm",
    "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo",
    "post_attention_layernorm.weight": "mlp_norm",
    "mlp.gate_proj.weight": "w_gate",
    "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
}
TOP_NAMES = {"fc.weight": "fc", "fc.bias": "fc_bias", "norm.weight": "final_norm",
             "lm_head.weight": "lm_head", "d2t": "d2t", "embed_tokens.weight": "embed"}  # fmt: skip
IGNORED = ("t2d",)  # the target -> draft vocabulary mask: not needed to draft


@dataclass(frozen=True)
class EagleHead:
    config: eagle.EagleConfig
    params: dict[str, np.ndarray]  # ours: [in, out] matrices; "embed" only if the head has one


def _read_weights(folder: Path) -> dict[str, np.ndarray]:
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors.numpy import load_file

        tensors = {}
        for f in files:
            tensors.update(load_file(str(f)))
        return tensors
    bin_file = folder / "pytorch_model.bin"
    if bin_file.exists():
        import torch

        state = torch.load(bin_file, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
                for k, v in state.items()}  # fmt: skip
    raise ValueError(f"speculative_config model {str(folder)!r} has no *.safetensors or "
                     "pytorch_model.bin")  # fmt: skip


def load_eagle_head(spec: SpeculativeConfig, target: LoadedForRunner) -> LoadedForRunner:
    """The head for `spec.model`, checked against the target; its KV spec sizes the cache."""
    if target.mesh is not None:
        raise ValueError(f"speculative_config method {spec.method!r} runs on one device; "
                         "tensor/data parallel meshes are not supported with it yet")  # fmt: skip
    folder = Path(spec.model)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"speculative_config model {spec.model!r}: no config.json (an "
                         f"{spec.method.upper()} head folder is expected)")  # fmt: skip
    hf = json.loads(config_file.read_text())
    t = target.config
    tensors = _read_weights(folder)
    config = head_config(spec.method, hf, t, {k.removeprefix("model.") for k in tensors})
    params = head_params(config, tensors, t.vocab_size, spec.model)
    kv = KVCacheSpec(1, target.kv_cache_spec.page_size, config.num_kv_heads, config.head_dim,
                     target.kv_cache_spec.dtype)  # fmt: skip
    return LoadedForRunner(EagleHead(config, params), config, None, target.dtype_name, kv,
                           target.memory_device, None)  # fmt: skip


def head_config(method: str, hf: dict, target, keys: set[str]) -> eagle.EagleConfig:
    """The head's sizes from its config.json; `keys` (its tensor names) tell whether an
    EAGLE-1 head keeps layer 0's input norm and an fc bias."""
    D = hf.get("hidden_size")
    if D != target.hidden_size:
        raise ValueError(f"{method.upper()} head hidden_size {D} does not fit the target's "
                         f"hidden_size {target.hidden_size}")  # fmt: skip
    heads = hf["num_attention_heads"]
    theta, scaling = rope_settings(hf)
    aux = ()
    if method == "eagle3":
        L = target.num_layers
        ids = (hf.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        aux = tuple(sorted(ids)) if ids else (2, L // 2, L - 3)
        if len(aux) != 3 or not all(0 <= i < L for i in aux):
            raise ValueError(f"EAGLE-3 aux hidden-state layers {aux} do not fit the target's "
                             f"{L} layers (three ids in [0, {L}) are needed)")  # fmt: skip
    return eagle.EagleConfig(
        method=method,
        hidden_size=D,
        intermediate_size=hf["intermediate_size"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or D // heads,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        draft_vocab_size=hf.get("draft_vocab_size", hf.get("vocab_size")) if method == "eagle3"
        else None,
        aux_layers=aux,
        input_norm=method == "eagle" and "layers.0.input_layernorm.weight" in keys,
        fc_bias=method == "eagle" and "fc.bias" in keys,
    )  # fmt: skip


def head_params(config: eagle.EagleConfig, tensors: dict, vocab_size: int, name: str) -> dict:
    """Our params from the head's tensors, every shape checked."""
    ours: dict[str, np.ndarray] = {}
    layer_prefixes = ("midlayer.", "layers.0.")
    for key, value in tensors.items():
        key = key.removeprefix("model.")
        if key in IGNORED:
            continue
        prefix = next((p for p in layer_prefixes if key.startswith(p)), None)
        mapped = LAYER_NAMES.get(key[len(prefix) :]) if prefix else TOP_NAMES.get(key)
        if mapped is None:
            raise ValueError(f"{config.method.upper()} head {name!r} has an unexpected tensor "
                             f"{key!r}")  # fmt: skip
        array = np.asarray(value)
        ours[mapped] = array.T if array.ndim == 2 and mapped != "embed" else array
    expected = eagle.param_shapes(config, vocab_size)
    if "embed" in ours:
        expected["embed"] = (vocab_size, config.hidden_size)
    missing = sorted(set(expected) - set(ours))
    if missing:
        raise ValueError(f"{config.method.upper()} head {name!r} lacks {missing}")
    for key, shape in expected.items():
        if tuple(ours[key].shape) != tuple(shape):
            got = tuple(ours[key].shape)
            raise ValueError(f"{config.method.upper()} head {name!r}: {key} has shape {got}, "
                             f"the target needs {tuple(shape)}")  # fmt: skip
    if config.method == "eagle3":
        ids = np.arange(config.draft_vocab_size) + ours["d2t"]
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"EAGLE-3 head {name!r}: d2t maps draft ids outside the target's "
                             f"vocabulary of {vocab_size}")  # fmt: skip
    return ours


def draft_tokens(
    params: dict, config: eagle.EagleConfig, out: jax.Array, target_logits
) -> jax.Array:
    """The greedy next token (a target id) after each row of the head's output [S, D].
    `target_logits(hidden)` is the target's LM head (EAGLE-1 drafts with it)."""
    if config.method == "eagle":
        return first_argmax(target_logits(out)).astype(jnp.int32)
    normed = rms_norm(out, params["final_norm"], config.rms_norm_eps)
    draft = first_argmax(linear(normed, params["lm_head"])).astype(jnp.int32)
    return draft + params["d2t"][draft]


class EagleProposer:
    def __init__(self, spec: SpeculativeConfig, head: LoadedForRunner, config: RunnerConfig):
        self.k = spec.num_speculative_tokens
        self.config = config
        self.head: EagleHead = head.model
        self.target_aux_layers = self.head.config.aux_layers
        dtype = jnp.float32
        self.params = eagle.to_device(self.head.params, dtype)
        self.kv_cache = jnp.zeros(head.kv_cache_spec.shape(config.num_pages),
                                  jnp.dtype(head.kv_cache_spec.dtype))  # fmt: skip
        self._graph = jax.jit(self._propose_fn, donate_argnums=(2,))
        self._target = None  # the runner's DeviceSteps, bound at warm-up

    def warmup_graphs(self, runner) -> list:
        self._target = runner.steps
        graphs = []
        for t in self.config.token_buckets:

            def call(t=t):
                runner.steps.forward(runner.empty_step_inputs(t))
                return self._run(np.zeros(t, np.int32), runner.empty_step_inputs(t),
                                 *empty_rows(self.config))  # fmt: skip

            graphs.append((f"EAGLE head T={t}", call))
        return graphs

    def on_forward(self, step: PreparedStep) -> None:
        pass  # the head needs the verified tokens: it runs in propose

    def propose(self, batch: InputBatch, step: PreparedStep, emitted, seq_ids):
        c = self.config
        inputs = step.inputs
        shifted = np.zeros(len(inputs.input_ids), np.int32)
        rows, positions, pages, limits, num = empty_rows(self.config)
        wanted = {s: i for i, s in enumerate(seq_ids)}
        caps = [0] * len(seq_ids)
        offset = 0
        for chunk in step.chunks:
            n = len(chunk.token_ids)
            committed = batch.token_ids(chunk.seq_id) + emitted.get(chunk.seq_id, [])
            after = committed[chunk.start_pos + 1 : chunk.start_pos + 1 + n]
            shifted[offset : offset + len(after)] = after
            i = wanted.get(chunk.seq_id)
            if i is not None:
                accepted = len(emitted[chunk.seq_id]) - 1
                rows[i] = offset + n - 1 - chunk.num_drafts + accepted
                positions[i] = len(committed) - 1
                page_ids = batch.page_ids(chunk.seq_id)
                pages[i, : len(page_ids)] = page_ids
                limits[i] = min(len(page_ids) * c.page_size, c.max_model_len)
                caps[i] = max(0, min(self.k, c.max_model_len - len(committed) - 1))
            offset += n
        num[0] = len(seq_ids)
        drafts = np.asarray(self._run(shifted, inputs, rows, positions, pages, limits, num))
        return {s: drafts[i, : caps[i]].tolist() for s, i in wanted.items() if caps[i]}

    def _run(self, shifted, inputs, rows, positions, pages, limits, num):
        target = self._target
        feature = target.aux if self.target_aux_layers else target.hidden
        self.kv_cache, drafts = self._graph(
            target.params, self.params, self.kv_cache, shifted, feature, inputs,
            rows, positions, pages, limits, num,
        )  # fmt: skip
        return drafts

    def _propose_fn(self, target_params, params, kv_cache, shifted, feature, inputs, rows,
                    positions, pages, limits, num_seqs):  # fmt: skip
        cfg, size = self.head.config, self.config.page_size
        target = nnx.merge(self._target.graphdef, target_params)
        # The head's own table, else the target's lookup (which dequantizes a quantized table).
        embed = (lambda t: params["embed"][t]) if "embed" in params else target.embedding_rows
        metadata = AttentionMetadata(
            slot_mapping=inputs.slot_mapping, cu_q_lens=inputs.cu_q_lens,
            kv_lens=inputs.kv_lens, page_indices=inputs.page_indices, num_seqs=inputs.num_seqs,
        )  # fmt: skip
        kv_cache, out = eagle.forward(params, cfg, embed, shifted, feature, inputs.positions,
                                      kv_cache, metadata)  # fmt: skip
        hidden = out[rows]  # [R, D]
        first = draft_tokens(params, cfg, hidden, target.compute_logits)
        num_rows = rows.shape[0]
        drafts = jnp.zeros((num_rows, self.k), jnp.int32).at[:, 0].set(first)

        def body(j, carry):  # draft j from draft j - 1 at the next position
            kv_cache, token, hidden, drafts = carry
            pos = positions + j - 1
            md = one_token_metadata(pos, pages, limits, num_seqs, size)
            kv_cache, hidden = eagle.forward(params, cfg, embed, token, hidden, pos, kv_cache, md)
            token = draft_tokens(params, cfg, hidden, target.compute_logits)
            return kv_cache, token, hidden, drafts.at[:, j].set(token)

        def loop():
            return jax.lax.fori_loop(1, self.k, body, (kv_cache, first, hidden, drafts))

        def skip():
            return kv_cache, first, hidden, drafts

        kv_cache, _, _, drafts = jax.lax.cond(num_seqs[0] > 0, loop, skip)
        return kv_cache, drafts
