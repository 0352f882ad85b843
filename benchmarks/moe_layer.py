"""MoE layer time: grouped matmuls (`jax.lax.ragged_dot` over pairs sorted by expert) vs a
dense loop over every expert, at 32 and 256 tokens, one jitted layer each, same run.

    .venv/bin/python benchmarks/moe_layer.py [--preset qwen3-30b-a3b] [--hidden 1024]

The layer is a preset's MoE block narrowed to --hidden model width (the expert count, top-k
and the expert width keep the preset's values, scaled by the same factor), so it fits the CPU.
Results go to benchmarks/results/moe-layer-<device>-<date>.{json,md}.
"""

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from xlaserve.bench.common import slug, today, write_results
from xlaserve.bench.roofline import device_name
from xlaserve.models.moe import moe_block
from xlaserve.models.registry import preset_config

RESULTS = Path(__file__).resolve().parent / "results"
CPU_NOTE = (
    "On the CPU, XLA lowers `ragged_dot` to one masked matmul over all E experts' weights "
    "(E times the routed work, plus a transposed copy of every expert's weights per call), "
    "so the dense loop wins here and the engine uses it on the CPU (`moe.default_impl`); "
    "TPU and GPU lower `ragged_dot` to grouped kernels."
)


def layer_params(config, dtype, seed: int = 0) -> dict[str, jax.Array]:
    D, E, F = config.hidden_size, config.num_experts, config.moe_intermediate_size
    keys = jax.random.split(jax.random.key(seed), 4)
    return {
        "w_router": jax.random.normal(keys[0], (D, E), dtype),
        "we_gate": (0.02 * jax.random.normal(keys[1], (E, D, F))).astype(dtype),
        "we_up": (0.02 * jax.random.normal(keys[2], (E, D, F))).astype(dtype),
        "we_down": (0.02 * jax.random.normal(keys[3], (E, F, D))).astype(dtype),
    }


def time_layer(fn, h, params, repeats: int) -> list[float]:
    jax.block_until_ready(fn(h, params))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(h, params))
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3-30b-a3b")
    parser.add_argument("--hidden", type=int, default=1024, help="model width of the layer")
    parser.add_argument("--tokens", default="32,256")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--note", default="", help="the machine's state while measuring")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    _, full = preset_config(args.preset)
    scale = args.hidden / full.hidden_size
    config = dataclasses.replace(
        full, hidden_size=args.hidden,
        moe_intermediate_size=max(8, round(full.moe_intermediate_size * scale)),
    )  # fmt: skip
    dtype = jnp.dtype(args.dtype)
    params = layer_params(config, dtype)
    rows = []
    for num_tokens in [int(t) for t in args.tokens.split(",")]:
        h = jax.random.normal(jax.random.key(1), (num_tokens, config.hidden_size), dtype)
        row = {"tokens": num_tokens}
        for impl in ("grouped", "dense"):
            fn = jax.jit(lambda h, p, impl=impl: moe_block(h, p, config, impl=impl))
            row[f"{impl}_ms"] = 1e3 * statistics.median(time_layer(fn, h, params, args.repeats))
        row["dense_over_grouped"] = row["dense_ms"] / row["grouped_ms"]
        rows.append(row)
        print(row, flush=True)
    device = device_name()
    result = {
        "benchmark": "moe_layer", "device": device, "date": today(), "preset": args.preset,
        "hidden": config.hidden_size, "experts": config.num_experts,
        "top_k": config.num_experts_per_tok, "expert_width": config.moe_intermediate_size,
        "dtype": args.dtype, "repeats": args.repeats, "note": args.note, "rows": rows,
    }  # fmt: skip
    lines = [
        f"# MoE layer: grouped matmul vs dense loop ({device}, {today()})", "",
        f"{args.preset} MoE block narrowed to D={config.hidden_size}: E={config.num_experts} "
        f"experts, top {config.num_experts_per_tok}, expert width "
        f"{config.moe_intermediate_size}, {args.dtype}; median of {args.repeats} jitted calls.",
        f"Machine state: {args.note or 'not given'}.", "",
        CPU_NOTE if jax.default_backend() == "cpu" else "", "",
        "| tokens | grouped (ragged_dot) ms | dense loop ms | dense / grouped |",
        "|---:|---:|---:|---:|",
        *(f"| {r['tokens']} | {r['grouped_ms']:.2f} | {r['dense_ms']:.2f} | "
          f"{r['dense_over_grouped']:.1f}x |" for r in rows),
        "",
    ]  # fmt: skip
    stem = f"moe-layer-{args.preset}-{slug(device)}-{today()}"
    print(write_results(args.out, stem, result, "\n".join(lines)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
