"""Measured hardware limits for roofline percentages; the code is xlaserve/bench/roofline.py
(kept importable here for benchmarks/kernels.py)."""

from xlaserve.bench.roofline import (  # noqa: F401
    copy_bandwidth,
    device_name,
    matmul_flops,
    read_bandwidth,
)
