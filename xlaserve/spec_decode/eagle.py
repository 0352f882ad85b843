"""EAGLE / EAGLE-3 draft heads (placeholder until implemented)."""


def load_eagle_head(spec, target):
    raise ValueError(f"speculative_config method {spec.method!r} is not available yet")
