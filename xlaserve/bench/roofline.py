"""Measured hardware limits, and the roofline a benchmark's steps are measured against.

`read_bandwidth`, `copy_bandwidth` and `matmul_flops` time large device operations;
`Roofline` turns them, with a runner's parameter and KV-cache bytes, into the ideal time of a
step: it must read the weights plus the live KV cache once (bytes / read bandwidth) and do
2 * parameters FLOPs per new token (FLOPs / matmul throughput); it takes the larger of the two.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp

from xlaserve.engine.runner_api import Runner


def device_name() -> str:
    """The accelerator's kind, or the CPU's model name and core count."""
    dev = jax.devices()[0]
    if dev.platform != "cpu":
        return getattr(dev, "device_kind", dev.platform)
    cpu = "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores)"


def _median_time(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _best_time(fn, *args, repeats: int = 10) -> float:
    """The fastest of several runs: other work on the machine only ever slows a read down,
    so the fastest read is the closest to what the memory system can deliver."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth(megabytes: int | None = None) -> float:
    """Bytes per second of a device copy (read + write counted), like a STREAM copy."""
    if megabytes is None:
        megabytes = 256 if jax.default_backend() == "cpu" else 2048
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    return 2 * x.nbytes / _median_time(copy, x)


def read_bandwidth(megabytes: int | None = None) -> float:
    """Bytes per second of reading a large array once (a sum), the fastest of ten reads: what
    streaming weights and KV from memory can get. On the CPU this is several times the copy
    figure above. (A median of five read 16-44 GB/s on a shared 2-core CPU; the fastest of
    ten is steadier and never flatters a step measured against it.)"""
    if megabytes is None:
        megabytes = 256 if jax.default_backend() == "cpu" else 2048
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    return x.nbytes / _best_time(jax.jit(jnp.sum), x)


def matmul_flops(dtype: str = "float32") -> float:
    """FLOP/s of a large square matmul in the given dtype, accumulated in float32 (as the
    engine's matmuls are)."""
    n = 2048 if jax.default_backend() == "cpu" else 8192
    a = jnp.ones((n, n), jnp.dtype(dtype))
    mm = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    return 2 * n**3 / _median_time(mm, a)


@dataclass(frozen=True)
class Roofline:
    """The ideal time of engine steps on one device (all quantities per device)."""

    parameter_count: int
    parameter_bytes: int
    kv_bytes_per_token: int
    read_bandwidth: float  # bytes/s
    matmul_flops: float  # FLOP/s

    @classmethod
    def of_runner(cls, runner: Runner, read_bandwidth: float, matmul_flops: float) -> Roofline:
        """From the runner's contract: weights split over its mesh's `model` axis (tensor
        parallel), KV bytes per token as one device holds them."""
        info = runner.device_info()
        shards = info.mesh_shape.get("model", 1) if info.mesh_shape else 1
        return cls(
            parameter_count=info.parameter_count // shards,
            parameter_bytes=info.parameter_bytes // shards,
            kv_bytes_per_token=runner.kv_cache_spec.bytes_per_token,
            read_bandwidth=read_bandwidth,
            matmul_flops=matmul_flops,
        )

    def step_seconds(self, new_tokens: int, kv_tokens: int) -> float:
        """One step feeding `new_tokens` tokens that attend to `kv_tokens` cached tokens."""
        memory = (self.parameter_bytes + kv_tokens * self.kv_bytes_per_token) / self.read_bandwidth
        compute = 2 * self.parameter_count * new_tokens / self.matmul_flops
        return max(memory, compute)

    def seconds(self, steps: Iterable[tuple[int, int]]) -> float:
        """Sum over steps given as (new tokens, KV tokens attended)."""
        return sum(self.step_seconds(n, kv) for n, kv in steps)
