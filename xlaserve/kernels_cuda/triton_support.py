"""Where the Triton kernels can run: CUDA tensors, or CPU tensors under Triton's interpreter."""

import torch


def is_interpreted(kernel) -> bool:
    """True when `kernel` was built by Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def check_runnable(kernel, device: torch.device) -> None:
    """Raises RuntimeError, saying what to do, when `kernel` cannot run on `device`."""
    if is_interpreted(kernel):
        if device.type != "cpu":
            raise RuntimeError(
                f"Triton kernels were built for the interpreter (TRITON_INTERPRET=1) but the "
                f"tensors are on {device}; unset TRITON_INTERPRET to run them compiled"
            )
        return
    if device.type != "cuda":
        raise RuntimeError(
            f"Triton kernels run on CUDA tensors, got tensors on {device}; to run them on "
            "the CPU set TRITON_INTERPRET=1 before triton is first imported"
        )
