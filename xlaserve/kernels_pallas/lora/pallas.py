"""Grouped LoRA matmul as a Pallas kernel (the accelerator path; same contract as
`reference.py`).

A program owns `block_tokens` tokens and `block_out` output columns. It loops over the stored
adapter slots and, only for slots some of its tokens use, shrinks its tokens through A[:, s, :]
([Bt, I] @ [I, R]), zeroes the rows of other slots and expands through B[s][:, block]
([Bt, R] @ [R, Bo]), accumulating in float32 (token slot s + 1 is stored slot s; token slot 0,
no adapter, is never visited). A decode batch whose tokens use few adapters so
does the work of those adapters only, and the grid, block shapes and loop bounds never depend
on which adapters are present (no recompiles when adapters load or mix).

Axis letters: T tokens, S slots, R rank, I input width, O output width; Bt, Bo block sizes.
`interpret=True` runs it on CPU through Pallas' interpreter (the tests do).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from xlaserve.kernels_pallas.lora.reference import validate_inputs

DEFAULT_BLOCK_TOKENS = 16
DEFAULT_BLOCK_OUT = 128


def _block(size: int, preferred: int) -> int:
    """The largest power of two <= preferred dividing size (size itself if none does)."""
    b = preferred
    while b > 1 and size % b:
        b //= 2
    return b if size % b == 0 and b > 1 else size


def _kernel(slots_ref, x_ref, a_ref, b_ref, o_ref, *, num_slots: int):
    slots = slots_ref[...]  # i32[Bt]
    x = x_ref[...]  # [Bt, I]

    def add_slot(s, acc):
        mine = slots == s + 1  # [Bt]

        def add(acc):
            a = a_ref[:, pl.ds(s, 1), :][:, 0, :]  # [I, R]
            shrunk = jnp.dot(x.astype(a.dtype), a, preferred_element_type=jnp.float32)
            shrunk = jnp.where(mine[:, None], shrunk, 0.0)  # [Bt, R]
            b = b_ref[pl.ds(s, 1), :, :][0]  # [R, Bo]
            return acc + jnp.dot(shrunk.astype(b.dtype), b, preferred_element_type=jnp.float32)

        return lax.cond(jnp.any(mine), add, lambda acc: acc, acc)

    acc = jnp.zeros(o_ref.shape, jnp.float32)
    o_ref[...] = lax.fori_loop(0, num_slots, add_slot, acc)


@functools.partial(jax.jit, static_argnames=("block_tokens", "block_out", "interpret"))
def lora_delta(
    x: jax.Array,
    a: jax.Array,
    b: jax.Array,
    token_slots: jax.Array,
    *,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
    block_out: int = DEFAULT_BLOCK_OUT,
    interpret: bool = False,
) -> jax.Array:
    """f32[T, O]; see `reference.lora_delta`."""
    validate_inputs(x, a, b, token_slots)
    T, I = x.shape
    _, S, R = a.shape
    O = b.shape[-1]
    bt, bo = _block(T, block_tokens), _block(O, block_out)
    return pl.pallas_call(
        functools.partial(_kernel, num_slots=S),
        grid=(T // bt, O // bo),
        in_specs=[
            pl.BlockSpec((bt,), lambda i, j: (i,)),
            pl.BlockSpec((bt, I), lambda i, j: (i, 0)),
            pl.BlockSpec((I, S, R), lambda i, j: (0, 0, 0)),
            pl.BlockSpec((S, R, bo), lambda i, j: (0, 0, j)),
        ],
        out_specs=pl.BlockSpec((bt, bo), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((T, O), jnp.float32),
        interpret=interpret,
    )(token_slots.astype(jnp.int32), x, a, b)
