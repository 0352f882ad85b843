"""GGUF packed-block matmul speed on an accelerator: the Pallas GPU kernel (dequantizing inside
the matmul) against XLA's dequantize-then-dot reference and a plain bfloat16 dot.

Llama-3-8B projection shapes (attention out 4096 -> 4096, gate/up 4096 -> 14336, down
14336 -> 4096) in the block types of a Q4_K_M file (Q4_K, Q6_K) and of Q8_0 / Q4_0 files, at
decode (1, 16 rows) and prefill (512 rows) sizes. Reports each implementation's median time,
the packed weight bytes it has to read per call divided by that time, and its max error
against the reference. The bfloat16 dot reads 2 bytes per weight: the ratio of its time to
the kernel's is the speed a packed model gains per projection.

    python benchmarks/gguf_matmul.py           # GPU
    python benchmarks/gguf_matmul.py --tiny    # CPU smoke run (kernel in its interpreter)

Writes benchmarks/results/gguf-matmul-<device>-<date>[-tiny].json.
"""

import argparse
import datetime
import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from kernels import max_abs_error, time_call  # noqa: E402
from roofline import device_name  # noqa: E402

from xlaserve.kernels_pallas.gguf_matmul import gpu, reference  # noqa: E402
from xlaserve.quantization.gguf_blocks import T, block_shape  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
SHAPES = {"attn_out": (4096, 4096), "gate_up": (4096, 14336), "down": (14336, 4096)}
TYPES = (T.Q4_K, T.Q6_K, T.Q8_0, T.Q4_0)
F16_FIELDS = {T.Q8_0: (0,), T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q4_K: (0, 2),
              T.Q6_K: (208,)}  # fmt: skip


def packed_weight(qtype, k: int, n: int, seed: int = 0) -> np.ndarray:
    """uint8 [row_bytes, n]: random quants with small finite float16 scales."""
    rng = np.random.default_rng(seed)
    values, nbytes = block_shape(qtype)
    raw = rng.integers(0, 256, size=(n, k // values, nbytes), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        d = rng.uniform(-0.01, 0.01, size=raw.shape[:2]).astype(np.float16)
        raw[:, :, offset : offset + 2] = d.view(np.uint8).reshape(*raw.shape[:2], 2)
    return np.ascontiguousarray(raw.reshape(n, -1).T)


def run(args) -> list[dict]:
    interpret = jax.default_backend() == "cpu"
    shapes = {"tiny": (256, 128)} if args.tiny else SHAPES
    row_counts = (1, 16) if args.tiny else (1, 16, 512)
    rows = []
    for shape_name, (k, n) in shapes.items():
        for qtype in TYPES:
            packed = jnp.asarray(packed_weight(qtype, k, n))
            dense = jnp.asarray(np.random.default_rng(1).normal(size=(k, n)) * 0.01, jnp.bfloat16)
            for m in row_counts:
                x = jnp.asarray(np.random.default_rng(2).normal(size=(m, k)), jnp.bfloat16)
                impls = {
                    "kernel": (
                        jax.jit(
                            lambda x, w, q=qtype: gpu.gguf_matmul(x, w, q, interpret=interpret)
                        ),
                        packed,
                    ),  # fmt: skip
                    "reference": (
                        jax.jit(lambda x, w, q=qtype: reference.gguf_matmul(x, w, q)),
                        packed,
                    ),  # fmt: skip
                    "bf16_dot": (
                        jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)),
                        dense,
                    ),  # fmt: skip
                }
                want = impls["reference"][0](x, packed)
                seconds = {}
                for name, (fn, w) in impls.items():
                    seconds[name] = time_call(fn, (x, w), args.iters)
                    row = dict(shape=shape_name, k=k, n=n, type=qtype.name, m=m, impl=name,
                               seconds=seconds[name], weight_bytes=int(w.nbytes),
                               weight_gbps=w.nbytes / seconds[name] / 1e9)  # fmt: skip
                    if name == "kernel":
                        row["max_abs_error_vs_reference"] = max_abs_error(fn(x, w), want)
                    rows.append(row)
                print(
                    f"{shape_name:8} {qtype.name:5} m {m:4}: "
                    + "  ".join(f"{name} {s * 1e6:9.1f} us" for name, s in seconds.items())
                    + f"  kernel x{seconds['bf16_dot'] / seconds['kernel']:.2f} vs bf16, "
                    f"x{seconds['reference'] / seconds['kernel']:.2f} vs reference",
                    flush=True,
                )
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per point")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    args = parser.parse_args(argv)
    args.iters = args.iters or (2 if args.tiny else 20)
    rows = run(args)
    device = device_name()
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    meta = dict(device=device, backend=jax.default_backend(), date=date, tiny=args.tiny,
                jax_version=jax.__version__,
                note="tiny CPU smoke run: the kernel ran in its interpreter, timings are not "
                "speed" if args.tiny else "weight_gbps = packed (or bf16) weight bytes / median "
                "time")  # fmt: skip
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9]+", "-", device.split(" (")[0]).strip("-")
    path = out / f"gguf-matmul-{stem}-{date[:10]}{'-tiny' if args.tiny else ''}.json"
    path.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
