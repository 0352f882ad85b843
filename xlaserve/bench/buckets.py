"""XLA shape-bucket sweep: per-bucket compile time, step time, throughput and memory, plus a
bucket-set recommendation for a traffic profile.

Token buckets (T) key the forward graph, sequence buckets (S) the sampling graph (DESIGN.md).
For each bucket the sweep compiles the graph (timed: lowering + compile), runs it `repeats`
times on a synthetic batch (median step time), and records XLA's memory analysis of the
executable. The recommendation replays the traffic profile through a steady-state batch model
(max_num_seqs requests in flight, prompt chunks filling the token budget) to get the
distribution of tokens per step, then scores candidate bucket sets by expected step time
(padding included, from the measured step times) and compile count.
"""

import argparse
import math
import statistics
import time
from dataclasses import dataclass

import jax
import numpy as np

from xlaserve.cli_args import add_engine_args, engine_args_from
from xlaserve.config import EngineArgs
from xlaserve.engine.builder import build_runner
from xlaserve.engine.input_batch import Chunk, pack_tokens
from xlaserve.engine.runner_api import power_of_two_buckets


@dataclass(frozen=True)
class TrafficProfile:
    """Prompt and output lengths of the requests a deployment expects."""

    name: str
    prompt_lens: np.ndarray
    output_lens: np.ndarray

    @classmethod
    def parse(cls, spec: str, num: int = 1000, seed: int = 0) -> "TrafficProfile":
        """`fixed:IN/OUT` or `sharegpt` (a long-tailed synthetic mix, ~200 in / ~180 out)."""
        rng = np.random.default_rng(seed)
        if spec.startswith("fixed:"):
            inp, out = (int(x) for x in spec.split(":", 1)[1].split("/"))
            return cls(spec, np.full(num, inp), np.full(num, out))
        if spec == "sharegpt":
            prompts = np.clip(rng.lognormal(math.log(120), 1.0, num), 4, 2048).astype(int)
            outputs = np.clip(rng.lognormal(math.log(120), 0.9, num), 4, 1024).astype(int)
            return cls(spec, prompts, outputs)
        raise ValueError(f"unknown traffic profile {spec!r}: use fixed:IN/OUT or sharegpt")


def tokens_per_step(profile: TrafficProfile, max_num_seqs: int, budget: int) -> np.ndarray:
    """Tokens in each step when the profile's requests run max_num_seqs at a time: every
    decoding request adds one token per step; prompts (chunked) fill the rest of the budget."""
    waiting = list(zip(profile.prompt_lens.tolist(), profile.output_lens.tolist(), strict=True))
    waiting.reverse()
    prefilling: list[list[int]] = []  # [prompt tokens left, output tokens] per admitted request
    decoding: list[int] = []  # output tokens left per decoding request
    steps = []
    while waiting or prefilling or decoding:
        while len(prefilling) + len(decoding) < max_num_seqs and waiting:
            prefilling.append(list(waiting.pop()))
        n = len(decoding)
        for item in prefilling:
            take = min(item[0], budget - n)
            item[0] -= take
            n += take
        decoding = [d - 1 for d in decoding if d > 1]
        decoding += [out for left, out in prefilling if left == 0]
        prefilling = [item for item in prefilling if item[0] > 0]
        steps.append(max(n, 1))
    return np.asarray(steps)


def bucket_of(n: np.ndarray, buckets: tuple[int, ...]) -> np.ndarray:
    return np.asarray(buckets)[np.searchsorted(np.asarray(buckets), n)]


def synthetic_batch(num_tokens: int, max_num_seqs: int, context: int, page_size: int):
    """`num_tokens` new tokens over min(num_tokens, max_num_seqs) sequences with `context`
    tokens already cached each (decode-like rows plus one prefill chunk taking the rest), as
    the input batch's chunks."""
    seqs = min(num_tokens, max_num_seqs)
    sizes = [1] * (seqs - 1) + [num_tokens - (seqs - 1)]
    batch, next_page = [], 0
    for i, n in enumerate(sizes):
        total = context + n
        pages = list(range(next_page, next_page + -(-total // page_size)))
        next_page += len(pages)
        batch.append(Chunk(i, [1] * n, context, pages, True))
    return batch


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def memory_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes)
    except Exception:  # some backends do not report it
        return None


def sweep(args: EngineArgs, *, repeats: int = 5, context: int = 128) -> dict:
    """Measures every token and sequence bucket of the engine configured by `args`."""
    if args.backend != "jax":
        raise ValueError(
            f"the bucket sweep measures the JAX backend's graphs, not {args.backend!r}"
        )
    _, _, runner = build_runner(args)
    steps, cfg = runner.steps, runner.config
    if (context + cfg.max_num_batched_tokens) > cfg.num_pages * cfg.page_size:
        context = max(0, cfg.num_pages * cfg.page_size // cfg.max_num_seqs - cfg.page_size)
    rows = []
    for t in cfg.token_buckets:
        batch = synthetic_batch(
            t, cfg.max_num_seqs, min(context, cfg.max_model_len - t), cfg.page_size
        )
        inputs = pack_tokens(batch, t, cfg.max_num_seqs, cfg.pages_per_seq, cfg.page_size)
        images = None  # a vision-language model's forward always takes the image rows
        if runner.vision is not None:
            images = (np.zeros((t, runner.vision.width), np.float32), np.zeros(t, np.bool_))
        lowered_at = time.perf_counter()
        compiled = steps.forward_graph.lower(
            steps.params, steps.kv_cache, inputs, steps.lora_weights, steps.last_tokens, images
        ).compile()
        compile_s = time.perf_counter() - lowered_at
        steps.forward(inputs)  # first run through the jit cache (compiled above)

        def run(inputs=inputs):
            steps.forward(inputs)
            return steps.rows

        step_s = timed(run, repeats)
        rows.append(dict(kind="tokens", bucket=t, compile_s=compile_s, step_s=step_s,
                         tokens_per_s=t / step_s, memory_bytes=memory_bytes(compiled)))  # fmt: skip
    for s in cfg.seq_buckets:
        batch = runner.empty_sampling_rows(s)
        lowered_at = time.perf_counter()
        compiled = steps.sample_graph.lower(
            steps.params, steps.rows, batch, steps.penalty_state
        ).compile()
        compile_s = time.perf_counter() - lowered_at
        step_s = timed(lambda batch=batch: steps.sample(batch).tokens, repeats)
        rows.append(dict(kind="seqs", bucket=s, compile_s=compile_s, step_s=step_s,
                         tokens_per_s=s / step_s, memory_bytes=memory_bytes(compiled)))  # fmt: skip
    if runner.vision is not None:
        rows += vision_rows(runner.vision, repeats)
    return {
        "model": args.model,
        "device": runner.device_info().device_kind,
        "platform": runner.device_info().platform,
        "max_num_seqs": cfg.max_num_seqs,
        "max_num_batched_tokens": cfg.max_num_batched_tokens,
        "context": context,
        "rows": rows,
    }


def vision_rows(vision, repeats: int) -> list[dict]:
    """The vision encoder's buckets (tiles, or patches for Qwen2.5-VL; multimodal/encoder.py):
    compile and step time."""
    rows = []
    for (_, call), b in zip(vision.warmup_graphs(), vision.buckets, strict=True):
        lowered_at = time.perf_counter()
        compiled = vision.graph.lower(vision.params, *call.args).compile()
        compile_s = time.perf_counter() - lowered_at
        call()
        step_s = timed(call, repeats)
        rows.append(dict(kind=vision.bucket_kind, bucket=b, compile_s=compile_s, step_s=step_s,
                         tokens_per_s=vision.bucket_features(b) / step_s,
                         memory_bytes=memory_bytes(compiled)))  # fmt: skip
    return rows


def candidate_sets(budget: int, smallest: int = 8) -> dict[str, tuple[int, ...]]:
    """Bucket sets to compare: powers of two from several minima, 1.5x steps, and one bucket."""
    sets = {
        f"pow2 from {m}": power_of_two_buckets(m, budget) for m in (smallest, 16, 64) if m < budget
    }
    half_steps, b = set(), float(smallest)
    while b < budget:
        half_steps.add(int(round(b)))
        b *= 1.5
    sets["x1.5 steps"] = (*sorted(half_steps), budget)
    sets["budget only"] = (budget,)
    return sets


def recommend(result: dict, profile: TrafficProfile) -> dict:
    """Scores bucket sets on the profile with step times interpolated from the sweep."""
    measured = {r["bucket"]: r for r in result["rows"] if r["kind"] == "tokens"}
    sizes = np.array(sorted(measured), float)
    times = np.array([measured[b]["step_s"] for b in sorted(measured)])
    compile_per_bucket = statistics.median(r["compile_s"] for r in measured.values())
    steps = tokens_per_step(profile, result["max_num_seqs"], result["max_num_batched_tokens"])
    scored = {}
    for name, buckets in candidate_sets(result["max_num_batched_tokens"]).items():
        padded = bucket_of(steps, buckets)
        step_time = np.interp(padded, sizes, times)
        scored[name] = {
            "buckets": list(buckets),
            "compiles": len(buckets),
            "est_compile_s": len(buckets) * compile_per_bucket,
            "padding_waste": float((padded - steps).sum() / padded.sum()),
            "est_run_s": float(step_time.sum()),
            "est_tokens_per_s": float(steps.sum() / step_time.sum()),
        }
    best = min(scored, key=lambda k: scored[k]["est_run_s"] + scored[k]["est_compile_s"])
    return {"profile": profile.name, "steps": int(len(steps)),
            "mean_tokens_per_step": float(steps.mean()), "sets": scored, "best": best}  # fmt: skip


def explain(rec: dict) -> str:
    lines = [
        f"Traffic profile {rec['profile']}: {rec['steps']} steps, "
        f"{rec['mean_tokens_per_step']:.1f} tokens per step on average.",
        "| bucket set | compiles | est. compile s | padding waste | est. run s | est. tok/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in rec["sets"].items():
        mark = " (recommended)" if name == rec["best"] else ""
        lines.append(
            f"| {name}{mark}: {s['buckets']} | {s['compiles']} | {s['est_compile_s']:.1f} | "
            f"{100 * s['padding_waste']:.1f}% | {s['est_run_s']:.2f} | "
            f"{s['est_tokens_per_s']:.0f} |"
        )
    lines.append(
        "Fewer buckets compile faster but pad more (each step runs at its bucket's size); "
        "the recommendation minimizes estimated run time plus compile time for this profile."
    )
    return "\n".join(lines)


def write_results(result: dict, rec: dict, out_dir) -> list:
    """CSV, JSON, a markdown table and a PNG plot, named by model, device and date."""
    import csv
    import datetime
    import json
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    device = (result["device"] or result["platform"]).replace(" ", "-")
    stem = out_dir / f"buckets-{Path(result['model']).name}-{device}-{date}"
    result = {**result, "date": date, "recommendation": rec}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(result["rows"][0]))
        writer.writeheader()
        writer.writerows(result["rows"])
    table = [
        "| graph | bucket | compile s | step ms | tokens/s | memory MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        mem = "-" if r["memory_bytes"] is None else f"{r['memory_bytes'] / 2**20:.1f}"
        table.append(
            f"| {r['kind']} | {r['bucket']} | {r['compile_s']:.2f} | {1e3 * r['step_s']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {mem} |"
        )
    header = f"# Bucket sweep: {result['model']} on {device} ({result['platform']}), {date}\n"
    stem.with_suffix(".md").write_text(header + "\n".join(table) + "\n\n" + explain(rec) + "\n")
    paths = [stem.with_suffix(x) for x in (".json", ".csv", ".md")]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return paths
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind, label in (
        (axes[0], "tokens", "token bucket T"),
        (axes[1], "seqs", "sequence bucket S"),
    ):
        rows = [r for r in result["rows"] if r["kind"] == kind]
        ax.plot(
            [r["bucket"] for r in rows], [1e3 * r["step_s"] for r in rows], "o-", label="step ms"
        )
        ax.plot(
            [r["bucket"] for r in rows],
            [r["compile_s"] * 1e3 for r in rows],
            "s--",
            label="compile ms",
        )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.legend()
    fig.suptitle(f"{result['model']} on {device}")
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    plt.close(fig)
    return [*paths, stem.with_suffix(".png")]


SWEEP_DEFAULTS = dict(max_model_len=1024, max_num_seqs=32, max_num_batched_tokens=512,
                      min_token_bucket=8)  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_args(p, defaults=SWEEP_DEFAULTS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--context", type=int, default=128, help="cached tokens per sequence")
    p.add_argument("--profile", default="sharegpt", help="sharegpt or fixed:IN/OUT")
    p.add_argument("--out", default="benchmarks/results")


def run(a: argparse.Namespace) -> int:
    result = sweep(engine_args_from(a), repeats=a.repeats, context=a.context)
    rec = recommend(result, TrafficProfile.parse(a.profile))
    for path in write_results(result, rec, a.out):
        print(path)
    print(explain(rec))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="xlaserve bench buckets", description=__doc__)
    add_arguments(p)
    return run(p.parse_args(argv))
