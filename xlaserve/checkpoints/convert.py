"""`xlaserve convert`: any checkpoint -> an orbax folder, in the source's precision by default.

Without an explicit dtype the parameters are stored as precisely as the source holds them:

    HF safetensors folder   the tensors' stored dtype (the widest, if they differ)
    GGUF                    F32 / F16 / BF16 tensors as such; quantized ones dequantize to float32
    orbax folder            its stored dtype
    dummy preset            float32

so a float32 source served with dtype="float32" gives the same numbers as the source itself.

The output folder must be new or empty unless `overwrite` (`--overwrite`): then the new folder is
written beside it first and swapped in only once complete, so a failed conversion leaves the old
contents as they were.
"""

import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors import SafetensorError, safe_open

from xlaserve.checkpoints import hf, orbax_store
from xlaserve.checkpoints.loader import (
    DTYPES,
    IGNORED_SUFFIXES,
    LOAD_FORMATS,
    detect_format,
    load_model,
    resolve_dtype,
)
from xlaserve.checkpoints.presets import resolve_bundled

# safetensors header dtype -> numpy dtype name; integer and bool tensors hold no precision.
SAFETENSORS_FLOATS = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
SAFETENSORS_NON_FLOATS = frozenset({"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"})
# GGUF tensor types kept as such; every other type (quantized or integer) is read as float32.
GGUF_FLOATS = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# GGUF tensors that are not parameters (gguf.read_gguf folds rope_freqs into the config).
GGUF_NON_PARAMS = frozenset({"rope_freqs.weight"})


@dataclass(frozen=True)
class ConvertReport:
    source: str  # the checkpoint read (file or folder; the preset name for dummy)
    out: str  # the orbax folder written
    dtype: str  # stored dtype name
    source_dtype: str  # the source's precision (see source_dtype)
    num_params: int
    bytes_written: int  # every file under `out` (parameters, tokenizer, metadata)
    seconds: float

    def describe(self) -> str:
        return (
            f"stored {self.dtype} (source {self.source_dtype}) parameters, "
            f"{_count(self.num_params)} params, {_size(self.bytes_written)} -> {self.out} "
            f"in {self.seconds:.1f}s"
        )


def source_dtype(model: str, load_format: str = "auto") -> str:
    """The precision the source checkpoint holds its parameters in, as a numpy dtype name.

    Reads only metadata (safetensors headers, GGUF tensor infos, the orbax marker file).
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format {load_format!r} is not one of {', '.join(LOAD_FORMATS)}")
    if load_format == "dummy":
        return "float32"  # presets initialize in the dtype asked for; float32 loses nothing
    path = resolve_bundled(model) or Path(model)
    fmt = detect_format(path) if load_format == "auto" else load_format
    if fmt == "orbax":
        return orbax_dtype(path)
    if fmt == "gguf":
        return gguf_dtype(_gguf_file(path))
    return safetensors_dtype(path)


def convert(
    model: str,
    out: str | Path,
    *,
    dtype: str | None = None,
    load_format: str = "auto",
    overwrite: bool = False,
) -> ConvertReport:
    """Loads `model` and stores its parameters in a new orbax folder `out`.

    dtype None keeps the source precision (float32 where the engine cannot hold it, e.g. a
    float64 source); "auto" means the engine's auto dtype for this platform; otherwise one of
    float32, bfloat16, float16. `overwrite` replaces the contents of a non-empty `out`.
    """
    start = time.perf_counter()
    chosen = None if dtype is None else jnp.dtype(resolve_dtype(dtype)).name
    out = _check_out(out, overwrite)  # before the (possibly long) load
    found = source_dtype(model, load_format)
    if chosen is None:
        chosen = found if found in DTYPES else "float32"
    loaded = load_model(model, load_format=load_format, dtype=chosen)
    replace = out.exists() and any(out.iterdir())
    # A non-empty folder (overwrite) is written beside and swapped in once complete.
    target = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)) if replace else out
    try:
        path = orbax_store.save(
            loaded.model, loaded.tokenizer, target, dtype=loaded.dtype, source=loaded.source
        )
    except BaseException:
        if replace:
            shutil.rmtree(target, ignore_errors=True)
        raise
    if replace:
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        out.rename(old)
        target.rename(out)
        shutil.rmtree(old)
        path = out
    params = jax.tree.leaves(nnx.state(loaded.model, nnx.Param))
    return ConvertReport(
        source=loaded.source,
        out=str(path),
        dtype=jnp.dtype(loaded.dtype).name,
        source_dtype=found,
        num_params=sum(int(x.size) for x in params),
        bytes_written=sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
        seconds=time.perf_counter() - start,
    )


def _check_out(out: str | Path, overwrite: bool) -> Path:
    """The absolute output folder, checked: new or empty, or any folder with `overwrite`."""
    path = Path(out).absolute()
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"output path exists and is not a folder: {path}")
    if not overwrite:
        try:
            orbax_store.check_out_dir(path)
        except FileExistsError as e:
            raise FileExistsError(f"{e} (--overwrite replaces its contents)") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# ---- peeking at checkpoint metadata ---------------------------------------------------------


def widest(names: set[str]) -> str:
    """The widest of some float dtype names; two different ones of the same width (float16
    and bfloat16) give float32, the narrowest dtype that holds both exactly."""
    if not names:
        raise ValueError("no floating-point tensors")
    bits = {name: jnp.dtype(name).itemsize for name in names}
    top = max(bits.values())
    at_top = {name for name, size in bits.items() if size == top}
    return at_top.pop() if len(at_top) == 1 else "float32"


def safetensors_dtype(folder: Path) -> str:
    """The widest float dtype of an HF folder's tensors, from the safetensors headers."""
    if not hf.is_hf_folder(folder):
        raise FileNotFoundError(f"no config.json in {folder}")
    found = set()
    for path in hf.safetensors_files(folder):
        try:
            with safe_open(str(path), framework="numpy") as f:
                for name in f.keys():
                    if name.endswith(IGNORED_SUFFIXES):
                        continue  # e.g. a float32 rotary inv_freq beside float16 weights
                    code = f.get_slice(name).get_dtype()
                    if code in SAFETENSORS_FLOATS:
                        found.add(SAFETENSORS_FLOATS[code])
                    elif code not in SAFETENSORS_NON_FLOATS:
                        raise ValueError(f"{path}: tensor {name!r} has unknown dtype {code!r}")
        except SafetensorError as e:
            raise ValueError(f"corrupt safetensors file {path}: {e}") from None
    if not found:
        raise ValueError(f"{folder}: no floating-point tensors")
    return widest(found)


def gguf_dtype(path: Path) -> str:
    """The widest dtype of a GGUF file's tensors once read (quantized types read as float32)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path, "r")
    except OSError:
        raise
    except Exception as err:  # as in gguf.read_gguf: every reader error means "invalid"
        raise ValueError(f"{path} is not a valid GGUF file: {err}") from err
    found = {
        GGUF_FLOATS.get(t.tensor_type.name, "float32")
        for t in reader.tensors
        if t.name not in GGUF_NON_PARAMS
    }
    if not found:
        raise ValueError(f"{path}: no tensors")
    return widest(found)


def orbax_dtype(folder: Path) -> str:
    return orbax_store.read_meta(folder)["dtype"]


def _gguf_file(path: Path) -> Path:
    # The file load_model reads for load_format gguf.
    if path.is_file():
        return path
    files = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no .gguf file at {path}")
    return files[0]


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.0f} {unit}" if n >= 10 * scale else f"{n / scale:.1f} {unit}"
    return f"{n} B"
