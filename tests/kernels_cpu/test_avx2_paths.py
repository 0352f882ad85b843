"""The CPU kernels' AVX2 paths on a machine with AVX512: the library built again with
`-mno-avx512f` (XLASERVE_CPU_KERNEL_FLAGS) and the GGUF and skinny matmul tests run against
it in a fresh process, so the paths an AVX2-only CPU takes are checked wherever CI runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from xlaserve.kernels_cpu import skinny
from xlaserve.kernels_cpu.build import EXTRA_FLAGS_ENV, cpu_flags

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(
    not ({"avx2", "fma", "f16c", "avx512f"} <= cpu_flags()) or not skinny.available(),
    reason="needs an AVX512 CPU with AVX2/FMA/F16C (an AVX2-only CPU runs these paths in "
    "the plain kernel tests)",
)
def test_kernels_built_without_avx512_pass_their_tests():
    env = dict(os.environ, **{EXTRA_FLAGS_ENV: "-mno-avx512f"})
    tests = ["tests/kernels_cpu/test_gguf_matmul.py", "tests/kernels_cpu/test_skinny_matmul.py"]
    probe = (
        "from xlaserve.kernels_cpu import skinny; import sys; "
        "sys.exit(0 if skinny.pair_rows() == 1 else 1)"  # 1: the AVX2 panels, not AVX512's 2
    )
    assert subprocess.run([sys.executable, "-c", probe], env=env, cwd=ROOT).returncode == 0
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        env=env, cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout, run.stdout[-500:]
