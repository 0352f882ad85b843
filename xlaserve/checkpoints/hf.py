"""Hugging Face model folders: config.json plus model.safetensors or a sharded index."""

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"model config not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt config file {path}: {e}") from None


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a folder: the single file, or every file the index names."""
    if (folder / INDEX_FILE).is_file():
        try:
            index = json.loads((folder / INDEX_FILE).read_text())
            names = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"corrupt safetensors index {folder / INDEX_FILE}: {e}") from None
        files = [folder / name for name in names]
    elif (folder / SINGLE_FILE).is_file():
        files = [folder / SINGLE_FILE]
    else:
        raise FileNotFoundError(f"no weights in {folder}: expected {SINGLE_FILE} or {INDEX_FILE}")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"weight file named in {INDEX_FILE} is missing: {f}")
    return files


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of the folder as numpy arrays in their stored dtype (bf16 via ml_dtypes)."""
    tensors: dict[str, np.ndarray] = {}
    for path in safetensors_files(folder):
        try:
            # The flax framework reads bf16, which plain numpy cannot.
            with safe_open(str(path), framework="flax") as f:
                for name in f.keys():
                    if name in tensors:
                        raise ValueError(f"tensor {name!r} appears twice (again in {path})")
                    tensors[name] = np.asarray(f.get_tensor(name))
        except SafetensorError as e:
            raise ValueError(f"corrupt safetensors file {path}: {e}") from None
    return tensors
