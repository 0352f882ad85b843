"""Compiles and loads the CPU kernels, and registers them with XLA as FFI targets.

The shared library is built with `-march=native` for the CPU it runs on, into a cache keyed
by the source, the jaxlib version (whose FFI headers it compiles against), the compiler and
the CPU's model and flags, so every later process loads it in milliseconds. Each build writes
a temporary file and renames it into place, so concurrent processes never load half a file.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib

log = logging.getLogger(__name__)

KERNELS = (
    "skinny_matmul.cc",
    "gguf_matmul.cc",
    "gguf_matmul_a8.cc",
    "int8_matmul.cc",
    "attention.cc",
)
SOURCES = tuple(Path(__file__).with_name(name) for name in KERNELS)
HEADERS = tuple(
    Path(__file__).with_name(name)
    for name in ("parallel.h", "gguf_blocks.h", "gguf_a8_activations.h")
)
CACHE_HOME = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
CACHE_DIR = CACHE_HOME / "xlaserve" / "kernels_cpu"
# -ffp-contract=off: no fused multiply-adds, so GGUF blocks dequantize with the rounding of
# xlaserve/quantization/gguf_blocks.py.
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-std=c++17", "-shared", "-fPIC", "-w")
# Extra compiler flags after FLAGS, e.g. "-mno-avx512f" builds the AVX2 paths on an AVX512
# machine (the tests do, to check them wherever they run).
EXTRA_FLAGS_ENV = "XLASERVE_CPU_KERNEL_FLAGS"


def compiler_flags() -> tuple[str, ...]:
    return (*FLAGS, *os.environ.get(EXTRA_FLAGS_ENV, "").split())


# FFI target names (see the handler symbols at the end of each .cc file).
SKINNY_MATMUL_BF16 = "xlaserve_skinny_matmul_bf16"
GGUF_MATMUL = "xlaserve_gguf_matmul"
GGUF_MATMUL_A8 = "xlaserve_gguf_matmul_a8"
INT8_ROWS_W8A16 = "xlaserve_int8_rows_w8a16"
INT8_PANELS_W8A16 = "xlaserve_int8_panels_w8a16"
INT8_PANELS_W8A8 = "xlaserve_int8_panels_w8a8"
PAGED_ATTENTION = "xlaserve_paged_attention"


def disabled_by_env() -> bool:
    """XLASERVE_CPU_KERNELS=0 keeps XLA's own matmuls (to compare, or to rule the kernels out)."""
    return os.environ.get("XLASERVE_CPU_KERNELS", "1").strip().lower() in ("0", "false", "off")


def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo text (x86 `flags`, Arm `Features`); empty
    where there is none."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def _cpu_signature() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _library_path(compiler: str) -> Path:
    key = hashlib.sha256()
    parts = [source.read_bytes() for source in (*SOURCES, *HEADERS)]
    parts += [jaxlib.__version__, compiler, " ".join(compiler_flags()), _cpu_signature()]
    for part in parts:
        part = part if isinstance(part, bytes) else part.encode()
        key.update(part)
        key.update(b"\0")
    return CACHE_DIR / f"xlaserve_cpu_kernels-{key.hexdigest()[:16]}.so"


def _compile(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [
            compiler,
            *compiler_flags(),
            "-I",
            jax.ffi.include_dir(),
            *map(str, SOURCES),
            "-o",
            tmp,
        ]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library with its FFI targets registered for the CPU, or None (logged
    once) where it cannot be built: no x86-64/AArch64 Linux, no compiler, a failed build."""
    if disabled_by_env():
        return None
    if platform.system() != "Linux":
        log.info("CPU kernels are built on Linux only; using XLA's matmuls")
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("no C++ compiler (g++/c++, or $CXX) found; the CPU keeps XLA's matmuls, "
                    "which decode at a fraction of memory bandwidth")  # fmt: skip
        return None
    path = _library_path(compiler)
    if not path.exists():
        try:
            _compile(compiler, path)
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            log.warning("building the CPU kernels failed; using XLA's matmuls:\n%s", detail)
            return None
    lib = ctypes.cdll.LoadLibrary(str(path))
    for name, symbol in ((SKINNY_MATMUL_BF16, lib.XlaserveSkinnyMatmulBf16),
                         (GGUF_MATMUL, lib.XlaserveGgufMatmul),
                         (GGUF_MATMUL_A8, lib.XlaserveGgufMatmulA8),
                         (INT8_ROWS_W8A16, lib.XlaserveInt8RowsW8A16),
                         (INT8_PANELS_W8A16, lib.XlaserveInt8PanelsW8A16),
                         (INT8_PANELS_W8A8, lib.XlaserveInt8PanelsW8A8),
                         (PAGED_ATTENTION, lib.XlaservePagedAttention)):  # fmt: skip
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
    return lib
