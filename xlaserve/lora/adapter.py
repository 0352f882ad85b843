"""A PEFT LoRA adapter in the engine's form: per target module, A [L, D_in, r] and
B [L, r, D_out] (float32, scaled, rank zero-padded to `max_lora_rank`), plus its identity.

numpy only (the scheduler and the input batch hold adapters). The model config is read by
duck typing (num_layers, hidden_size, intermediate_size, num_heads, num_kv_heads, head_dim).

Identity: a SHA-256 over the adapter's scaling and every stored tensor (name, shape, bytes).
Two folders with the same weights share KV pages in the prefix cache; an adapter reloaded with
other weights under the same name never does.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass

import numpy as np

from xlaserve.checkpoints.peft import PeftFolder
from xlaserve.errors import InvalidRequestError

# Our parameter name -> (PEFT module name, its block, is the input axis sharded under TP).
TARGET_MODULES = {
    "wq": ("q_proj", "self_attn"),
    "wk": ("k_proj", "self_attn"),
    "wv": ("v_proj", "self_attn"),
    "wo": ("o_proj", "self_attn"),
    "w_gate": ("gate_proj", "mlp"),
    "w_up": ("up_proj", "mlp"),
    "w_down": ("down_proj", "mlp"),
}
PEFT_TO_OURS = {peft: ours for ours, (peft, _) in TARGET_MODULES.items()}
KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$"
)
UNSUPPORTED_TARGETS = ("embed_tokens", "lm_head", "lora_embedding")


def module_shapes(config) -> dict[str, tuple[int, int]]:
    """Our target module -> (D_in, D_out) of its base weight."""
    D, F = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return {"wq": (D, q), "wk": (D, kv), "wv": (D, kv), "wo": (q, D),
            "w_gate": (D, F), "w_up": (D, F), "w_down": (F, D)}  # fmt: skip


@dataclass(frozen=True, eq=False)
class LoRAAdapter:
    """A loaded adapter: immutable, shared by reference (requests, the input batch, slots)."""

    name: str
    path: str
    rank: int  # the adapter's own rank (before padding)
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora
    identity: str  # hex SHA-256 of the weights and scaling
    # target module -> (A f32[L, D_in, R], B f32[L, R, D_out] with the scaling folded in),
    # R = max_lora_rank; layers the adapter leaves alone are zero.
    weights: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def key(self) -> bytes:
        """What the prefix cache chains a sequence's page hashes from."""
        return bytes.fromhex(self.identity)


def _bad(message: str) -> InvalidRequestError:
    return InvalidRequestError("lora_path", message)


def adapter_scaling(config: dict, rank: int) -> float:
    alpha = config.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0:
        raise _bad(f"lora_alpha must be a positive number, got {alpha!r}")
    rslora = config.get("use_rslora", False)
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


def check_config(config: dict, max_lora_rank: int, source: str) -> int:
    """The adapter's rank, after refusing what the engine cannot apply exactly."""
    if config.get("peft_type", "LORA") != "LORA":
        raise _bad(f"{source}: peft_type {config.get('peft_type')!r} is not LORA")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise _bad(f"{source}: r must be an int >= 1, got {rank!r}")
    if rank > max_lora_rank:
        raise _bad(f"{source}: LoRA rank {rank} exceeds max_lora_rank {max_lora_rank}")
    for flag in ("use_dora", "fan_in_fan_out"):
        if config.get(flag):
            raise _bad(f"{source}: {flag}=true is not supported")
    if config.get("bias", "none") != "none":
        raise _bad(f"{source}: bias={config.get('bias')!r} is not supported (only 'none')")
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            raise _bad(f"{source}: per-module {field} is not supported")
    saved = config.get("modules_to_save") or []
    if saved:
        raise _bad(f"{source}: modules_to_save {saved} (full copies of base modules, e.g. "
                   "the embedding or LM head) are not supported")  # fmt: skip
    targets = config.get("target_modules")
    if isinstance(targets, list | tuple):
        for target in targets:
            name = str(target).rsplit(".", 1)[-1]
            if name in UNSUPPORTED_TARGETS:
                raise _bad(f"{source}: embedding and LM-head adapters ({name}) are not supported")
            if name not in PEFT_TO_OURS:
                raise _bad(f"{source}: target module {name!r} is not a module of this model "
                           f"(supported: {', '.join(PEFT_TO_OURS)})")  # fmt: skip
    return rank


def adapter_identity(scaling: float, tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(json.dumps({"scaling": scaling}).encode())
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name], np.float32)
        h.update(f"{name}:{t.shape}".encode())
        h.update(t.tobytes())
    return h.hexdigest()


def adapter_from_peft(folder: PeftFolder, name: str, model_config, max_lora_rank: int):
    """The engine's form of a PEFT folder for this model; a clear error for anything else."""
    source = folder.path
    rank = check_config(folder.config, max_lora_rank, source)
    scaling = adapter_scaling(folder.config, rank)
    shapes = module_shapes(model_config)
    L = model_config.num_layers
    found: dict[tuple[str, int], dict[str, np.ndarray]] = {}
    for key, tensor in folder.tensors.items():
        m = KEY.match(key)
        if m is None:
            if any(u in key for u in UNSUPPORTED_TARGETS):
                raise _bad(f"{source}: embedding and LM-head adapters are not supported ({key})")
            raise _bad(f"{source}: tensor {key!r} is not a LoRA weight of a decoder layer")
        layer, block, module, which = int(m[1]), m[2], m[3], m[4]
        ours = PEFT_TO_OURS.get(module)
        if ours is None or TARGET_MODULES[ours][1] != block:
            raise _bad(f"{source}: target module {block}.{module} ({key}) is not a module of "
                       f"this model")  # fmt: skip
        if layer >= L:
            raise _bad(f"{source}: {key} is for layer {layer}, but the model has {L} layers")
        d_in, d_out = shapes[ours]
        want = (rank, d_in) if which == "A" else (d_out, rank)
        if tuple(tensor.shape) != want:
            raise _bad(f"{source}: {key} has shape {tuple(tensor.shape)}, but the base "
                       f"model's {module} needs {want} at rank {rank}")  # fmt: skip
        found.setdefault((ours, layer), {})[which] = tensor
    weights = {}
    for ours in TARGET_MODULES:
        layers = {layer: ab for (mod, layer), ab in found.items() if mod == ours}
        if not layers:
            continue
        d_in, d_out = shapes[ours]
        a = np.zeros((L, d_in, max_lora_rank), np.float32)
        b = np.zeros((L, max_lora_rank, d_out), np.float32)
        for layer, ab in layers.items():
            if set(ab) != {"A", "B"}:
                missing = "B" if "A" in ab else "A"
                raise _bad(f"{source}: layer {layer} {TARGET_MODULES[ours][0]} has no "
                           f"lora_{missing} weight")  # fmt: skip
            a[layer, :, :rank] = ab["A"].T
            b[layer, :rank, :] = ab["B"].T * scaling
        weights[ours] = (a, b)
    return LoRAAdapter(
        name=name,
        path=source,
        rank=rank,
        scaling=scaling,
        identity=adapter_identity(scaling, folder.tensors),
        weights=weights,
    )
