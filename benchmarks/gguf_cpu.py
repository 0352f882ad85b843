"""The CPU GGUF kernels on SmolLM2-135M's shapes: exact (`quantization="gguf"`) against int8
activations (`"gguf_a8"`), the latter on GGUF's block rows and on the planar rows its Q4_0 /
Q4_1 projections get at load.

One jitted chain per mode reads 30 layers of Q4_1 projections (q/k/v 576x960, o 576x576,
gate/up 576x3072, down 1536x576: 66 MB, more than the last-level cache, so the weights stream
from memory as at decode) at M = 1, 8 and 64 rows, then the Q8_0 LM head (49152x576, 30 MB)
on its own. Reported: ms per chain (median of --repeats) and GB/s of weights read, next to the
machine's read bandwidth measured in the same process (xlaserve.bench.roofline).

    python benchmarks/gguf_cpu.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from xlaserve.bench.roofline import device_name, read_bandwidth
from xlaserve.kernels_cpu import gguf as gguf_kernel
from xlaserve.kernels_cpu.build import library

Q4_1, Q8_0 = 3, 8
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # (in, out) per layer
MODES = {"gguf (exact)": (False, False), "gguf_a8, block rows": (True, False),
         "gguf_a8, planar rows": (True, True)}  # fmt: skip


def random_rows(rng, out: int, k: int, qtype: int) -> np.ndarray:
    nbytes = {Q4_1: 20, Q8_0: 34}[qtype]
    rows = rng.integers(0, 256, (out, k // 32 * nbytes), dtype=np.uint8)
    blocks = rows.reshape(out, -1, nbytes)
    blocks[..., 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # finite scales
    if qtype == Q4_1:
        blocks[..., 2:4] = np.frombuffer(np.float16(-0.08).tobytes(), np.uint8)
    return rows


def timed(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - begin)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,8,64")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None, help="folder for the .md / .json results")
    args = parser.parse_args()
    if library() is None:
        raise SystemExit("the CPU kernels are not built on this machine")
    rng = np.random.default_rng(0)
    layers = [[random_rows(rng, out, k, Q4_1) for k, out in SHAPES] for _ in range(30)]
    planar = [[gguf_kernel.planar_rows(w, Q4_1) for w in layer] for layer in layers]
    head = jnp.asarray(random_rows(rng, 49152, 576, Q8_0))
    chain_bytes = sum(w.nbytes for layer in layers for w in layer)
    weights = {False: [[jnp.asarray(w) for w in layer] for layer in layers],
               True: [[jnp.asarray(w) for w in layer] for layer in planar]}  # fmt: skip
    bandwidth = read_bandwidth()
    results = []
    for m in [int(r) for r in args.rows.split(",")]:
        xs = {k: jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16) for k in (576, 1536)}
        for mode, (a8, is_planar) in MODES.items():

            def chain(xs, ws, m=m, a8=a8, is_planar=is_planar):
                total = jnp.zeros((m, 1), jnp.float32)
                for layer in ws:
                    for (k, _), w in zip(SHAPES, layer, strict=True):
                        y = gguf_kernel.matmul(xs[k], w, Q4_1, a8, is_planar)
                        total = total + y[:, :1]
                return total

            seconds = timed(jax.jit(chain), (xs, weights[is_planar]), args.repeats)
            results.append(dict(rows=m, mode=mode, part="projections", ms=seconds * 1e3,
                                gb_per_s=chain_bytes / seconds / 1e9))  # fmt: skip
        for mode, a8 in (("gguf (exact)", False), ("gguf_a8", True)):
            fn = jax.jit(lambda x, w, a8=a8: gguf_kernel.matmul(x, w, Q8_0, a8))
            seconds = timed(fn, (xs[576], head), args.repeats)
            results.append(dict(rows=m, mode=mode, part="Q8_0 head", ms=seconds * 1e3,
                                gb_per_s=head.nbytes / seconds / 1e9))  # fmt: skip
    device = device_name()
    lines = [
        f"# GGUF CPU kernels on SmolLM2-135M shapes, {device}, {date.today()}",
        "",
        f"Q4_1 projections of 30 layers ({chain_bytes / 1e6:.1f} MB) in one jitted chain, and "
        f"the Q8_0 LM head ({head.nbytes / 1e6:.1f} MB); median of {args.repeats}. Read "
        f"bandwidth of this machine, same process: {bandwidth / 1e9:.1f} GB/s.",
        "",
        "| rows | weights | mode | ms | GB/s |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['rows']} | {r['part']} | {r['mode']} | {r['ms']:.3f} | "
                     f"{r['gb_per_s']:.1f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        short = device.split(" (")[0].replace(" ", "-")
        stem = Path(args.out) / f"gguf-cpu-kernels-{short}-{date.today()}"
        stem.with_suffix(".md").write_text(text)
        stem.with_suffix(".json").write_text(json.dumps(
            dict(device=device, date=str(date.today()), read_bandwidth=bandwidth,
                 results=results), indent=1))  # fmt: skip
        print(f"wrote {stem}.{{md,json}}")


if __name__ == "__main__":
    main()
