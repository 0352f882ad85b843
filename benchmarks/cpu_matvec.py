"""Skinny matmuls on the CPU: which XLA options stream a decoder's weights fastest at 1-32 rows.

A SmolLM2-135M-shaped stack of projections (30 layers of q/k/v 576x960, o 576x576, gate/up
576x3072, down 1536x576; 94 M weights) runs as one jitted chain at M = 1, 2, 8 and 32 rows, in
bfloat16 and float32 weights (float32 accumulation, as the engine's `linear`), each XLA flag
set in its own process, the sets interleaved over --rounds rounds (the best round counts);
the last row is the engine's own CPU kernel (xlaserve/kernels_cpu: bfloat16 weights packed in
panels, an XLA FFI custom call), run in the default-flags process.
Reported: ms per chain and GB/s of weights read, next to the machine's read bandwidth
(xlaserve.bench.roofline.read_bandwidth) measured in the same process.

    python benchmarks/cpu_matvec.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

FLAG_SETS = {
    "default": "",
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "onednn": "--xla_cpu_use_onednn=true",
    "single-thread eigen": "--xla_cpu_multi_thread_eigen=false",
}
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]
LAYERS = 30
ROWS = (1, 2, 8, 32)
KERNEL_ROW = "xlaserve CPU kernel (packed bfloat16)"


def child() -> None:
    import jax
    import jax.numpy as jnp

    from xlaserve.bench.roofline import read_bandwidth
    from xlaserve.kernels_cpu import skinny
    from xlaserve.models.layers import linear

    kernel: dict[str, dict] = {}

    def chain(ws, x):
        h = x
        for i in range(LAYERS):
            qkv = linear(h, ws[4 * i])
            gu = linear(h + linear(qkv[:, :576], ws[4 * i + 1]), ws[4 * i + 2])
            h = h + linear(jax.nn.silu(gu[:, :1536]) * gu[:, 1536:], ws[4 * i + 3])
        return h

    def best(f, *args, repeats=20):
        jax.block_until_ready(f(*args))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(f(*args))
            times.append(time.perf_counter() - start)
        return min(times)

    out = {"read_bandwidth_GBps": read_bandwidth() / 1e9}
    key = jax.random.key(0)
    for dtype in ("bfloat16", "float32"):
        ws = []
        for _ in range(LAYERS):
            for shape in SHAPES:
                key, sub = jax.random.split(key)
                ws.append((0.02 * jax.random.normal(sub, shape)).astype(dtype))
        nbytes = sum(w.nbytes for w in ws)
        f = jax.jit(chain)
        for m in ROWS:
            x = jnp.ones((m, 576), jnp.dtype(dtype))
            seconds = best(f, ws, x)
            out[f"{dtype} M={m}"] = {"ms": 1e3 * seconds, "GBps": nbytes / seconds / 1e9}
        if dtype == "bfloat16" and os.environ.get("XLA_FLAGS", "") == "" and skinny.available():
            packed = [skinny.PackedWeight(skinny.pack(w)) for w in ws]
            f = jax.jit(chain)
            for m in ROWS:
                x = jnp.ones((m, 576), jnp.bfloat16)
                seconds = best(f, packed, x)
                kernel[f"bfloat16 M={m}"] = {"ms": 1e3 * seconds, "GBps": nbytes / seconds / 1e9}
    if kernel:
        out["kernel"] = kernel
    print(json.dumps(out))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--note", default="", help="the machine's state, for the results file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child()
        return 0
    from xlaserve.bench.common import slug, today
    from xlaserve.bench.roofline import device_name

    results: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, flags in FLAG_SETS.items():
            env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
            proc = subprocess.run([sys.executable, __file__, "--child"], env=env,
                                  capture_output=True, text=True, check=True)  # fmt: skip
            measured = json.loads(proc.stdout.strip().splitlines()[-1])
            if "kernel" in measured:
                kernel = dict(measured.pop("kernel"), read_bandwidth_GBps=measured[
                    "read_bandwidth_GBps"])  # fmt: skip
                kept_kernel = results.setdefault(KERNEL_ROW, kernel)
                for k, v in kernel.items():
                    if isinstance(v, dict) and v["ms"] < kept_kernel[k]["ms"]:
                        kept_kernel[k] = v
            kept = results.setdefault(name, measured)
            for k, v in measured.items():
                if isinstance(v, dict) and v["ms"] < kept[k]["ms"]:
                    kept[k] = v
                elif k == "read_bandwidth_GBps":
                    kept[k] = max(kept[k], v)
            print(name, json.dumps(measured), flush=True)
    device, date = device_name(), today()
    cols = [f"{d} M={m}" for d in ("bfloat16", "float32") for m in ROWS]
    lines = [
        f"# Skinny matmuls on {device}, {date}", "",
        f"SmolLM2-shaped projection chain ({LAYERS} layers, 94 M weights), best of "
        f"{args.rounds} interleaved rounds per XLA flag set; ms per chain (GB/s of weights).",
        *([args.note, ""] if args.note else [""]),
        "| XLA flags | read GB/s | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 2) + "|",
    ]  # fmt: skip
    for name, r in results.items():
        cells = [f"{r[c]['ms']:.1f} ({r[c]['GBps']:.1f})" if c in r else "-" for c in cols]
        label = name if name == KERNEL_ROW else f"{name} `{FLAG_SETS[name]}`"
        lines.append(f"| {label} | {r['read_bandwidth_GBps']:.1f} | " + " | ".join(cells) + " |")
    stem = args.out / f"cpu-matvec-{slug(device)}-{date}"
    args.out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"device": device, "date": date,
                                                     "flags": FLAG_SETS, "results": results,
                                                     "note": args.note}, indent=1))  # fmt: skip
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
