"""The torch/Triton backend: a second, independent implementation for numerical parity.

- `ragged_paged_attention/`, `kv_cache_update/`: a plain-torch `reference.py` (the truth) and a
  Triton `triton_kernel.py` per op, with the JAX kernels' contracts and KV cache layout.
- `model.py`: the Llama / Qwen decoder in torch; `loader.py`: loads it from the same sources
  through `xlaserve.checkpoints`, with the same checks.
- `runner.py`: the engine's runner interface over it (`EngineArgs(backend="torch")`);
  `sampler.py`: the JAX sampler's semantics in torch.
- `parity.py`: `xlaserve parity`, the two backends compared on one checkpoint.

Nothing here imports triton until a Triton kernel is used: triton is optional, and the CPU
default is the torch reference.
"""
