"""Ragged paged attention speed: our kernel, JAX's stock Pallas kernel and the jnp reference.

For decode-only and mixed (decode + prefill chunks) batches over context lengths 256..32k and
page sizes 16/64/128, times each implementation on the same inputs in one run and reports
the effective HBM bandwidth: bytes of K/V the batch has to read (every real token's K and V
once) divided by the time, next to the device's measured copy bandwidth (roofline.py: bytes
read + written by `a + 1` over a large array / time). Side-by-side ratios are the claim;
absolute numbers depend on the device, which is named in the results.

    python benchmarks/kernels.py                 # GPU (or TPU): full sweep
    python benchmarks/kernels.py --tiny          # CPU smoke run: tiny shapes, kernels in
                                                 # their interpreters (not a speed number)

Writes benchmarks/results/kernels-<device>-<date>[-tiny].{json,csv}.
Implementations: "ours" (gpu.py on GPU, tpu.py on TPU), "stock" (decode only: JAX's
`jax.experimental.pallas.ops.gpu.paged_attention`, which wants K and V as separate
[K, P, page_size, H] arrays; converted once, outside the timing), "reference" (jnp).
Model shape: Llama-3-8B attention (N=32, K=8, H=128, bfloat16) unless --tiny.
"""

import argparse
import csv
import dataclasses
import datetime
import functools
import json
import pathlib
import platform
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from roofline import copy_bandwidth, device_name  # noqa: E402

from xlaserve.kernels_pallas.ragged_paged_attention import gpu, reference, tpu  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
KV_BUDGET_BYTES = 2 << 30  # K/V bytes per decode batch: big enough to measure bandwidth


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str  # "decode" | "mixed"
    context: int  # kv_len of every sequence
    page_size: int
    num_seqs: int  # decode sequences
    prefill_chunks: int  # mixed only: sequences with a `chunk`-token prefill chunk
    chunk: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: str


def sweep(tiny: bool) -> list[Shape]:
    if tiny:
        heads, dtype, contexts, page_sizes = (4, 2, 64), "float32", (64, 256), (16,)
    else:
        heads, dtype = (32, 8, 128), "bfloat16"
        contexts, page_sizes = (256, 1024, 4096, 8192, 16384, 32768), (16, 64, 128)
    num_heads, num_kv_heads, head_dim = heads
    token_bytes = 2 * num_kv_heads * head_dim * jnp.dtype(dtype).itemsize
    shapes = []
    for context, page_size in ((c, p) for c in contexts for p in page_sizes):
        seqs = 4 if tiny else int(np.clip(KV_BUDGET_BYTES // (context * token_bytes), 1, 256))
        for kind in ("decode", "mixed"):
            chunks, chunk = (0, 0) if kind == "decode" else (2, min(context, 16 if tiny else 512))
            shapes.append(
                Shape(
                    kind=kind,
                    context=context,
                    page_size=page_size,
                    num_seqs=seqs,
                    prefill_chunks=chunks,
                    chunk=chunk,
                    num_heads=num_heads,
                    num_kv_heads=num_kv_heads,
                    head_dim=head_dim,
                    dtype=dtype,
                )
            )
    return shapes


def make_inputs(shape: Shape, seed: int = 0):
    """Reference-contract arguments: every sequence at `context` tokens, pages shuffled."""
    rng = np.random.default_rng(seed)
    num_seqs = shape.num_seqs + shape.prefill_chunks
    q_lens = [1] * shape.num_seqs + [shape.chunk] * shape.prefill_chunks
    pages_per_seq = -(-shape.context // shape.page_size)
    num_pages = num_seqs * pages_per_seq
    page_indices = rng.permutation(num_pages).astype(np.int32).reshape(num_seqs, pages_per_seq)
    cu_q_lens = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    key = jax.random.key(seed)
    kq, kkv = jax.random.split(key)
    dtype = jnp.dtype(shape.dtype)
    q = jax.random.normal(kq, (int(cu_q_lens[-1]), shape.num_heads, shape.head_dim), dtype)
    kv_cache = jax.random.normal(
        kkv, (num_pages, shape.page_size, 2 * shape.num_kv_heads, shape.head_dim), dtype
    )
    return (
        q,
        kv_cache,
        jnp.full((num_seqs,), shape.context, jnp.int32),
        jnp.asarray(page_indices),
        jnp.asarray(cu_q_lens),
        jnp.asarray([num_seqs], jnp.int32),
    )


def kv_bytes(shape: Shape) -> int:
    token_bytes = 2 * shape.num_kv_heads * shape.head_dim * jnp.dtype(shape.dtype).itemsize
    return (shape.num_seqs + shape.prefill_chunks) * shape.context * token_bytes


def stock_decode(shape: Shape, args, interpret: bool):
    """JAX's Pallas GPU paged attention on the same decode batch, or None if it cannot."""
    from jax.experimental.pallas.ops.gpu import paged_attention

    q, kv_cache, kv_lens, page_indices, _, _ = args
    pages_per_seq = page_indices.shape[1]
    k_splits = next(s for s in (16, 8, 4, 2, 1) if pages_per_seq % s == 0)
    per_split = pages_per_seq // k_splits
    per_block = next(b for b in (8, 4, 2, 1) if per_split % b == 0)
    # [P, ps, 2K, H] -> K and V as [K, P, ps, H], once, outside the timed call.
    k_pages = jnp.moveaxis(kv_cache[:, :, 0::2], 2, 0)
    v_pages = jnp.moveaxis(kv_cache[:, :, 1::2], 2, 0)
    fn = jax.jit(
        functools.partial(
            paged_attention.paged_attention,
            k_splits=k_splits,
            pages_per_compute_block=per_block,
            interpret=interpret,
        )
    )
    q = q * jnp.asarray(shape.head_dim**-0.5, q.dtype)  # it has no sm_scale argument
    return fn, (q, k_pages, v_pages, page_indices, kv_lens)


def implementations(shape: Shape, args, backend: str):
    """name -> (jitted fn, its args, interpreted?) for this platform."""
    sm_scale = shape.head_dim**-0.5
    interpret = backend == "cpu"
    impls = {}
    if backend == "tpu":
        ours = functools.partial(tpu.ragged_paged_attention, sm_scale=sm_scale)
    else:
        ours = functools.partial(gpu.ragged_paged_attention, sm_scale=sm_scale, interpret=interpret)
    impls["ours"] = (jax.jit(ours), args, interpret)
    if backend in ("gpu", "cpu") and shape.kind == "decode":
        fn, stock_args = stock_decode(shape, args, interpret)
        impls["stock"] = (fn, stock_args, interpret)
    ref = functools.partial(reference.ragged_paged_attention, sm_scale=sm_scale)
    impls["reference"] = (jax.jit(ref), args, False)
    return impls


def time_call(fn, args, iters: int) -> float:
    """Median seconds of `iters` calls after two warm-up calls."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def max_abs_error(out, want) -> float:
    return float(jnp.max(jnp.abs(out.astype(jnp.float32) - want.astype(jnp.float32))))


def format_row(row: dict) -> str:
    head = (
        f"{row['kind']:6} ctx {row['context']:6} ps {row['page_size']:3} "
        f"seqs {row['num_seqs']:3} {row['impl']:9}"
    )
    if "error" in row:
        return f"{head} failed: {row['error']}"
    speedups = " ".join(
        f"x{row[k]:.2f} vs {k.removeprefix('speedup_vs_')}" for k in row if k.startswith("speedup")
    )
    return (
        f"{head} {row['seconds'] * 1e3:9.3f} ms {row['effective_gbps']:8.1f} GB/s "
        f"({row['fraction_of_copy_bw']:.0%} of copy) {speedups}"
    )


def run(args: argparse.Namespace) -> list[dict]:
    backend = jax.default_backend()
    device = device_name()
    copy_bw = copy_bandwidth(16 if args.tiny else None)  # roofline.py: a + 1, read + write
    print(f"device {device} ({backend}); copy bandwidth {copy_bw / 1e9:.1f} GB/s", flush=True)
    rows = []
    for shape in sweep(args.tiny):
        inputs = make_inputs(shape)
        impls = implementations(shape, inputs, backend)
        want = impls["reference"][0](*inputs)
        shape_rows = []
        for name, (fn, fn_args, interpreted) in impls.items():
            row = dict(**dataclasses.asdict(shape), impl=name, interpret=interpreted)
            try:
                seconds = time_call(fn, fn_args, args.iters)
                out = fn(*fn_args).reshape(want.shape)
            except Exception as e:  # a shape an implementation rejects: record it, go on
                shape_rows.append(dict(row, error=repr(e)[:300]))
                continue
            bandwidth = kv_bytes(shape) / seconds
            shape_rows.append(
                dict(
                    row,
                    seconds=seconds,
                    kv_bytes=kv_bytes(shape),
                    effective_gbps=bandwidth / 1e9,
                    fraction_of_copy_bw=bandwidth / copy_bw,
                    max_abs_error_vs_reference=max_abs_error(out, want),
                )
            )
        seconds = {r["impl"]: r["seconds"] for r in shape_rows if "seconds" in r}
        for row in shape_rows:
            if row["impl"] == "ours" and "ours" in seconds:
                for other in ("stock", "reference"):
                    if other in seconds:
                        row[f"speedup_vs_{other}"] = seconds[other] / seconds["ours"]
            print(format_row(row), flush=True)
        rows += shape_rows
    meta = dict(
        device=device,
        backend=backend,
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        jax_version=jax.__version__,
        python=platform.python_version(),
        tiny=args.tiny,
        iters=args.iters,
        copy_bandwidth_gbps=copy_bw / 1e9,
        note=(
            "tiny CPU smoke run: kernels ran in their interpreters, timings are not speed"
            if args.tiny
            else "effective_gbps = K/V bytes of the batch / median time"
        ),
    )
    write(rows, meta, args)
    return rows


def write(rows: list[dict], meta: dict, args: argparse.Namespace) -> None:
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = re.sub(r"[^A-Za-z0-9]+", "-", meta["device"].split(" (")[0]).strip("-")
    stem = f"kernels-{device}-{meta['date'][:10]}" + ("-tiny" if args.tiny else "")
    (out_dir / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    fields = sorted({k for row in rows for k in row})
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["device", "date", *fields])
        writer.writeheader()
        for row in rows:
            writer.writerow(dict(device=meta["device"], date=meta["date"], **row))
    print(f"wrote {out_dir / stem}.json and .csv")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per point")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    if args.iters is None:
        args.iters = 3 if args.tiny else 20
    run(args)


if __name__ == "__main__":
    main()
