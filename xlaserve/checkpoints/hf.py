"""Hugging Face model folders: config.json plus model.safetensors or a sharded index."""

import json
from pathlib import Path

import ml_dtypes
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


# float8 dtypes safetensors' flax reader cannot build (it looks them up in numpy): read from
# their bytes (pre-quantized checkpoints, xlaserve/checkpoints/compressed_tensors.py).
FLOAT8 = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of the folder as numpy arrays in their stored dtype (bf16 and float8 via
    ml_dtypes)."""
    tensors: dict[str, np.ndarray] = {}
    for path in safetensors_files(folder):
        try:
            header = _header(path)
            # The flax framework reads bf16, which plain numpy cannot.
            with safe_open(str(path), framework="flax") as f:
                for name in f.keys():
                    if name in tensors:
                        raise ValueError(f"tensor {name!r} appears twice (again in {path})")
                    if header.get(name, {}).get("dtype") in FLOAT8:
                        tensors[name] = _float8(path, header, name)
                    else:
                        tensors[name] = np.asarray(f.get_tensor(name))
        except SafetensorError as e:
            raise ValueError(f"corrupt safetensors file {path}: {e}") from None
    return tensors


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size < path.stat().st_size:
            raise ValueError(f"corrupt safetensors file {path}: header size {size}")
        try:
            return json.loads(f.read(size)) | {"__data_start__": 8 + size}
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
            raise ValueError(f"corrupt safetensors file {path}: {e}") from None


def _float8(path: Path, header: dict, name: str) -> np.ndarray:
    entry = header[name]
    begin, end = entry["data_offsets"]
    with open(path, "rb") as f:
        f.seek(header["__data_start__"] + begin)
        data = f.read(end - begin)
    return np.frombuffer(data, FLOAT8[entry["dtype"]]).reshape(entry["shape"]).copy()
