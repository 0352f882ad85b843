"""The torch/Triton backend's tests: Triton kernels in Triton's interpreter on the CPU (CI), or
compiled on a GPU.

TRITON_INTERPRET is read when a kernel is decorated, so it is set here (to 1 unless already
set) before any test module imports triton. Kernel tests take a device parameter:
- "cpu": the interpreter; skipped when the kernels are compiled (TRITON_INTERPRET=0).
- "cuda": marked `gpu`; needs CUDA and compiled kernels, so on a GPU machine run
  `TRITON_INTERPRET=0 pytest -m gpu tests/kernels_cuda`.
Torch runs single-threaded here: on 2 shared cores its default 2-thread pool spins against the
other processes and small matmuls get ~30x slower.
"""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"].lower() in ("1", "true", "on", "yes")
HAS_CUDA = torch.cuda.is_available()

if "xlaserve.kernels_cuda.ragged_paged_attention.triton_kernel" in sys.modules:
    # Imported earlier in this session, perhaps under another setting: fail loudly, not oddly.
    from xlaserve.kernels_cuda.ragged_paged_attention import triton_kernel
    from xlaserve.kernels_cuda.triton_support import is_interpreted

    if is_interpreted(triton_kernel._ragged_paged_attention_kernel) != INTERPRET:
        raise RuntimeError("Triton kernels were imported before TRITON_INTERPRET was settled")

interpreted_kernels = pytest.mark.skipif(
    not INTERPRET, reason="Triton kernels are compiled here (TRITON_INTERPRET=0)"
)
gpu = (
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_CUDA, reason="CUDA is not available"),
    pytest.mark.skipif(
        INTERPRET,
        reason="Triton kernels are interpreted here; run `TRITON_INTERPRET=0 pytest -m gpu`",
    ),
)
DEVICES = [
    pytest.param("cpu", marks=interpreted_kernels),
    pytest.param("cuda", marks=gpu),
]


@pytest.fixture(scope="package", autouse=True)
def single_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
