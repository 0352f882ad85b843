"""Ragged paged attention in torch: `reference.py` (plain torch, the truth) and
`triton_kernel.py` (Triton, same contract; imported only when used, triton is optional)."""
