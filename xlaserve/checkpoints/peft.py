"""PEFT adapter folders: adapter_config.json + adapter_model.safetensors (or .bin).

Reads the files only; what the tensors mean for a model is `xlaserve.lora.adapter`'s business.
Every problem is an `InvalidRequestError("lora_path", ...)` naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from xlaserve.errors import InvalidRequestError

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"


@dataclass(frozen=True)
class PeftFolder:
    path: str
    config: dict
    tensors: dict[str, np.ndarray]  # stored names -> arrays in float32


def _bad(message: str) -> InvalidRequestError:
    return InvalidRequestError("lora_path", message)


def read_peft_folder(path: str | Path) -> PeftFolder:
    folder = Path(path)
    if not str(path) or not folder.is_dir():
        raise _bad(f"LoRA adapter folder not found: {str(path)!r}")
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise _bad(f"no {CONFIG_FILE} in LoRA adapter folder {folder}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(f"corrupt {config_path}: {e}") from None
    if not isinstance(config, dict):
        raise _bad(f"corrupt {config_path}: expected a JSON object")
    if (folder / SAFETENSORS_FILE).is_file():
        tensors = _read_safetensors(folder / SAFETENSORS_FILE)
    elif (folder / BIN_FILE).is_file():
        tensors = _read_bin(folder / BIN_FILE)
    else:
        raise _bad(f"no {SAFETENSORS_FILE} or {BIN_FILE} in LoRA adapter folder {folder}")
    if not tensors:
        raise _bad(f"LoRA adapter folder {folder} holds no tensors")
    return PeftFolder(str(folder), config, tensors)


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    try:
        with safe_open(str(path), framework="flax") as f:  # flax reads bf16, numpy cannot
            return {name: np.asarray(f.get_tensor(name), np.float32) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise _bad(f"corrupt adapter weights {path}: {e}") from None


def _read_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise _bad(f"{path} is a torch file: reading it needs torch installed") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise _bad(f"corrupt adapter weights {path}: {e}") from None
    if not isinstance(state, dict):
        raise _bad(f"corrupt adapter weights {path}: expected a dict of tensors")
    return {name: t.detach().float().numpy() for name, t in state.items()}
