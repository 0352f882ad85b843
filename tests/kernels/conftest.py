"""Where the kernel tests run: the TPU interpreter, the GPU interpreter, or a real device.

Every kernel test takes a `mode` parameter:
- "interpret": on CPU, always. TPU kernels run under `pltpu.force_tpu_interpret_mode()`
  (simulated HBM/VMEM/SMEM, DMAs and semaphores; uninitialised memory reads as NaN), GPU
  kernels with `interpret=True` (Pallas' HLO interpreter).
- "device": the kernel compiled for the real accelerator, marked `tpu` or `gpu` and skipped
  with the reason when none is visible. tests/conftest.py pins JAX to the CPU unless
  JAX_PLATFORMS is already set, so on a GPU machine run e.g.
  `JAX_PLATFORMS=cuda,cpu pytest -m gpu tests/kernels`.
"""

import contextlib
import os

import jax
import pytest
from jax.experimental.pallas import tpu as pltpu

# The full dtype x page size x heads x head dim x block-size product instead of the CI subset.
FULL_GRID = os.environ.get("XLASERVE_FULL_KERNEL_GRID") == "1"


def has_platform(platform: str) -> bool:
    try:
        return bool(jax.devices(platform))
    except RuntimeError:
        return False


def modes(platform: str) -> list:
    """The "interpret" mode, then the real-device mode marked with its platform."""
    mark = getattr(pytest.mark, platform)
    skip = pytest.mark.skipif(
        not has_platform(platform), reason=f"no {platform.upper()} visible to JAX"
    )
    return ["interpret", pytest.param("device", marks=(mark, skip))]


@contextlib.contextmanager
def tpu_mode(mode: str):
    """Runs the enclosed TPU kernel calls in the TPU interpreter unless mode is "device"."""
    if mode == "device":
        yield
        return
    try:
        with pltpu.force_tpu_interpret_mode():
            yield
    finally:
        # The interpreter keeps its simulated memory after a failure; start clean next time.
        pltpu.reset_tpu_interpret_mode_state()


@pytest.fixture(autouse=FULL_GRID)
def _release_compiled_programs():
    """The full grid compiles ~1,000 interpreted programs in one process. Without dropping
    each after its test, XLA's CPU compiler segfaulted once after ~250 of them (no single
    case reproduces it); with it, a 516-test run went through."""
    yield
    jax.clear_caches()
