"""KV-cache write in torch: `reference.py` (plain torch) and `triton_kernel.py` (Triton)."""
