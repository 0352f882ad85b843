"""Measured hardware limits for roofline percentages: copy bandwidth and matmul throughput."""

import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp


def device_name() -> str:
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


def copy_bandwidth(megabytes: int | None = None) -> float:
    """Bytes per second of a device copy (read + write counted), like a STREAM copy."""
    if megabytes is None:
        megabytes = 256 if jax.default_backend() == "cpu" else 2048
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    copy = jax.jit(lambda a: a + 1.0)
    return 2 * x.nbytes / _median_time(copy, x)


def read_bandwidth(megabytes: int | None = None) -> float:
    """Bytes per second of reading a large array once (a sum): what streaming weights and KV
    from memory gets. On the CPU this is several times the copy figure above."""
    if megabytes is None:
        megabytes = 256 if jax.default_backend() == "cpu" else 2048
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    return x.nbytes / _median_time(jax.jit(jnp.sum), x)


def matmul_flops(dtype: str = "float32") -> float:
    """FLOP/s of a large square matmul in the given dtype, accumulated in float32 (as the
    engine's matmuls are)."""
    n = 2048 if jax.default_backend() == "cpu" else 8192
    a = jnp.ones((n, n), jnp.dtype(dtype))
    mm = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    return 2 * n**3 / _median_time(mm, a)
