"""x @ GGUF packed blocks as a Pallas GPU kernel (Triton lowering); same contract as
`reference.py`.

The weight stays in the GGUF file's blocks, as `quantize_model` stores them: uint8
[row_bytes, N], one column per output channel, blocks running down the rows. A program owns
`block_m` rows of x and `block_n` output columns and walks the blocks of the input axis: for
each block it loads the block's bytes (contiguous `block_n`-byte runs of the columns: coalesced
loads), unpacks the quants with integer operations into x's dtype (exact: at most 6 bits), and
multiplies them with the matching x columns, one tensor-core dot per sub-block sharing a scale
(32 values; 16 for Q6_K, the Triton minimum). Each dot's f32 result is scaled by its sub-block's
scale row (and Q4_1 / Q4_K's minimum times the sub-block's x sum subtracted or added), so the
weights are read once at their packed size and never exist dequantized in memory.

The float16 scales are put together from their two bytes with integer operations and a
16-bit bit-cast. Results equal the reference up to float32 summation order (the reference
scales each weight before the dot; here each sub-block's dot is scaled).

Axis letters: M rows of x, K input width (values), N output width; Bm, Bn block sizes.
`interpret=True` runs it on CPU through Pallas' HLO interpreter (the tests do).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from xlaserve.quantization.gguf_blocks import T, block_shape

DEFAULT_BLOCK_M = 16  # Triton's smallest dot tile


def default_block_n(padded_m: int, n: int) -> int:
    """Output columns per program: 32 for decode-sized x (M <= 16: more programs to spread a
    bandwidth-bound read over the SMs, e.g. 128 for a 4096-wide output), 64 for larger M; a
    smaller power of two where N needs it. A guess until a GPU measures it
    (benchmarks/gguf_matmul.py)."""
    block = 32 if padded_m <= 16 else 64
    while block > 16 and n % block:
        block //= 2
    return block


class _Weight:
    """The program's weight block: packed columns uint8 [row_bytes, Bn], or packed rows uint8
    [Bn, row_bytes] (`rows`: an LM head's [V, row_bytes], read without a transposed copy)."""

    def __init__(self, ref, rows: bool):
        self.ref, self.rows = ref, rows

    def load(self, offset, count: int) -> jax.Array:
        """uint8 [count, Bn]: bytes offset .. offset + count of each output channel."""
        if self.rows:
            return self.ref[:, pl.ds(offset, count)].T
        return self.ref[pl.ds(offset, count), :]


def _f16_row(w: _Weight, offset) -> jax.Array:
    """f32 [1, Bn]: the float16 stored little-endian in bytes offset, offset + 1."""
    low = w.load(offset, 1).astype(jnp.int32)
    high = w.load(offset + 1, 1).astype(jnp.int32)
    bits = (low | (high << 8)).astype(jnp.uint16)
    return lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32)


def _bytes(w: _Weight, offset, count: int) -> jax.Array:
    """int32 [count, Bn]: bytes offset .. offset + count of each output channel."""
    return w.load(offset, count).astype(jnp.int32)


def _dot(x: jax.Array, q: jax.Array) -> jax.Array:
    """f32 [Bm, Bn]: x [Bm, k] @ small integers q int32 [k, Bn], in x's dtype (exact)."""
    return jnp.dot(x, q.astype(x.dtype), preferred_element_type=jnp.float32)


def _x(x_ref, start, size: int) -> jax.Array:
    return x_ref[:, pl.ds(start, size)]


def _row_sum(x: jax.Array) -> jax.Array:
    return jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True)  # [Bm, 1]


def _q8_0(x_ref, w, j, acc):  # 34 B: d, 32 x int8
    o, k = j * 34, j * 32
    q = w.load(o + 2, 32).astype(jnp.int8).astype(jnp.int32)  # two's complement
    return acc + _dot(_x(x_ref, k, 32), q) * _f16_row(w, o)


def _q4_0(x_ref, w, j, acc):  # 18 B: d, 16 B of nibbles (low: values 0-15, high: 16-31)
    o, k = j * 18, j * 32
    qs = _bytes(w, o + 2, 16)
    dot = _dot(_x(x_ref, k, 16), (qs & 0x0F) - 8) + _dot(_x(x_ref, k + 16, 16), (qs >> 4) - 8)
    return acc + dot * _f16_row(w, o)


def _q4_1(x_ref, w, j, acc):  # 20 B: d, m, 16 B of nibbles
    o, k = j * 20, j * 32
    qs = _bytes(w, o + 4, 16)
    x = _x(x_ref, k, 32)
    dot = _dot(_x(x_ref, k, 16), qs & 0x0F) + _dot(_x(x_ref, k + 16, 16), qs >> 4)
    return acc + dot * _f16_row(w, o) + _row_sum(x) * _f16_row(w, o + 2)


def _q5_0(x_ref, w, j, acc):
    """22 B: d, 32 high bits (bit i: value i), 16 B of nibbles as Q4_0; value d * (q - 16)."""
    o, k = j * 22, j * 32
    qh = functools.reduce(
        lambda bits, i: bits | (_bytes(w, o + 2 + i, 1) << (8 * i)),
        range(1, 4),
        _bytes(w, o + 2, 1),
    )  # [1, Bn]: the 32 bits as int32
    qs = _bytes(w, o + 6, 16)
    row = lax.broadcasted_iota(jnp.int32, qs.shape, 0)  # value index within the half
    low = (qs & 0x0F) | (((qh >> row) & 1) << 4)
    high = (qs >> 4) | (((qh >> (row + 16)) & 1) << 4)
    dot = _dot(_x(x_ref, k, 16), low - 16) + _dot(_x(x_ref, k + 16, 16), high - 16)
    return acc + dot * _f16_row(w, o)


def _q4_k(x_ref, w, j, acc):
    """144 B: d, dmin, 12 B of 6-bit scales and mins, 128 B of nibbles in four 32-byte chunks
    (chunk c: low nibbles are values 64c..64c+31, high ones the next 32)."""
    o, k = j * 144, j * 256
    d, dmin = _f16_row(w, o), _f16_row(w, o + 2)
    s = [_bytes(w, o + 4 + i, 1) for i in range(12)]  # [1, Bn] each
    for i in range(8):
        if i < 4:
            sc, mn = s[i] & 0x3F, s[i + 4] & 0x3F
        else:
            sc = (s[i + 4] & 0x0F) | ((s[i - 4] >> 6) << 4)
            mn = (s[i + 4] >> 4) | ((s[i] >> 6) << 4)
        qs = _bytes(w, o + 16 + 32 * (i // 2), 32)
        q = qs & 0x0F if i % 2 == 0 else qs >> 4
        x = _x(x_ref, k + 32 * i, 32)
        scale = d * sc.astype(jnp.float32)
        acc = acc + _dot(x, q) * scale - _row_sum(x) * (dmin * mn.astype(jnp.float32))
    return acc


def _q6_k(x_ref, w, j, acc):
    """210 B: 128 B of low nibbles, 64 B of high 2-bit pairs, 16 int8 scales, d. Per half h
    of 128 values and group g of 32: low nibbles from ql[64h + 32(g % 2) + l] (low for g < 2,
    high after), high bits (qh[32h + l] >> 2g) & 3; one scale per 16 values."""
    o, k = j * 210, j * 256
    d = _f16_row(w, o + 208)
    for h in range(2):
        for g in range(4):
            for part in range(2):
                l0 = 16 * part
                ql = _bytes(w, o + 64 * h + 32 * (g % 2) + l0, 16)
                qh = _bytes(w, o + 128 + 32 * h + l0, 16)
                low = ql & 0x0F if g < 2 else ql >> 4
                q = (low | (((qh >> (2 * g)) & 0x03) << 4)) - 32
                sc = _bytes(w, o + 192 + 8 * h + 2 * g + part, 1)
                sc = sc.astype(jnp.int8).astype(jnp.float32)  # signed
                x = _x(x_ref, k + 128 * h + 32 * g + l0, 16)
                acc = acc + _dot(x, q) * (d * sc)
    return acc


_BLOCK_STEPS = {
    T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q4_K: _q4_k, T.Q6_K: _q6_k,
}  # fmt: skip


def _kernel(x_ref, w_ref, o_ref, *, step, num_blocks: int, rows: bool):
    acc = jnp.zeros(o_ref.shape, jnp.float32)
    w = _Weight(w_ref, rows)
    o_ref[...] = lax.fori_loop(0, num_blocks, functools.partial(step, x_ref, w), acc)


def supports(qtype: int) -> bool:
    return T(qtype) in _BLOCK_STEPS


@functools.partial(
    jax.jit, static_argnames=("qtype", "rows", "block_m", "block_n", "num_warps", "interpret")
)
def gguf_matmul(
    x: jax.Array,
    packed: jax.Array,
    qtype: int,
    *,
    rows: bool = False,
    block_m: int = DEFAULT_BLOCK_M,
    block_n: int | None = None,
    num_warps: int = 4,
    interpret: bool = False,
) -> jax.Array:
    """f32 [M, N]; see `reference.gguf_matmul` (packed [row_bytes, N], or [N, row_bytes] with
    `rows`). M is padded to block_m inside."""
    qtype = T(qtype)
    if qtype not in _BLOCK_STEPS:
        raise ValueError(f"the GPU GGUF kernel reads {sorted(t.name for t in _BLOCK_STEPS)}; "
                         f"got {qtype.name}")  # fmt: skip
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    values, nbytes = block_shape(qtype)
    n, row_bytes = packed.shape if rows else packed.shape[::-1]
    m, k = x.shape
    if row_bytes % nbytes or row_bytes // nbytes * values != k:
        raise ValueError(f"{qtype.name} packed rows of {row_bytes} bytes do not hold the "
                         f"{k} input values of x")  # fmt: skip
    padded_m = -(-m // block_m) * block_m
    block_n = block_n or default_block_n(padded_m, n)
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {size}")
    if n % block_n:
        raise ValueError(f"N = {n} is not a multiple of block_n = {block_n}")
    x = jnp.pad(x, ((0, padded_m - m), (0, 0)))
    out = pl.pallas_call(
        functools.partial(_kernel, step=_BLOCK_STEPS[qtype], num_blocks=k // values, rows=rows),
        grid=(padded_m // block_m, n // block_n),
        in_specs=[
            pl.BlockSpec((block_m, k), lambda i, j: (i, 0)),
            pl.BlockSpec((block_n, row_bytes), lambda i, j: (j, 0))
            if rows
            else pl.BlockSpec((row_bytes, block_n), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((padded_m, n), jnp.float32),
        compiler_params=_compiler_params(num_warps),
        interpret=interpret,
        name="xlaserve_gguf_matmul",
    )(x, packed)
    return out[:m]


def _compiler_params(num_warps: int):
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
