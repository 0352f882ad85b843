"""Decode latency at small batch sizes (like `vllm bench latency`): a batch of B requests with
random token-id prompts of --input-len tokens, each generating exactly --output-len tokens
(greedy, ignore_eos), submitted together and stepped until done; --num-iters times per batch
size of --batch-sizes, after --num-iters-warmup unmeasured runs. Every iteration uses fresh
prompts, so none finds another's in the prefix cache.

Reported per batch size, timed on the host around the engine's steps:
  TTFT            submit -> a request's first token (the prefill; chunked when the batch's
                  prompts exceed the token budget), mean/p50/p90/p99 over requests
  ms per output token   decode phase (every request has its first token) / its steps: each
                  step gives every request one token; median over iterations
  TPOT            per request, (end - first token) / (output_len - 1), as vLLM reports it
  latency         submit -> the batch's last token, per iteration
  roofline        the decode steps' ideal time (weights + live KV cache read once, or
                  2 * params FLOPs per token, whichever is longer; see roofline.py) per step,
                  and the measured time's share of it ("% of roofline")
  host ms/step    decode steps' wall time inside engine.step() minus the time it waited for
                  the device's tokens: scheduling, packing, dispatch and outputs. With async
                  scheduling (the default) it overlaps the device's work instead of adding to
                  it; --async-scheduling no shows the serial figure.
  TTFT by length  --ttft-input-lens: batch-1 TTFT for prompts of those lengths (median).
  llama.cpp       --llama-cpp: the same GGUF in llama-cpp-python (when installed), batch 1,
                  same prompts, threads and output length (EOS banned), side by side.

    xlaserve bench latency --input-len 128 --output-len 128 --batch-sizes 1,4,16
    xlaserve bench latency --model llama-3-8b --load-format dummy --dtype bfloat16 \\
        --max-model-len 4096 --input-len 1024 --output-len 128 --batch-sizes 1,8,32 \\
        --max-num-seqs 32

Writes OUT/latency-MODEL-inINoutOUT-bsB1-B2-DTYPE-DEVICE-DATE.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import numpy as np

from xlaserve.bench import llama_cpp_peer
from xlaserve.bench.common import (
    _engines,
    add_out_argument,
    build_llm,
    dist,
    recording,
    runners,
    slug,
    today,
    validated_main,
    write_results,
)
from xlaserve.bench.roofline import Roofline, device_name, matmul_flops, read_bandwidth
from xlaserve.cli_args import add_engine_args, engine_args_from

ENGINE_DEFAULTS = dict(max_model_len=512, max_num_seqs=16)


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--output-len", type=int, default=128,
                        help="output tokens per request (>= 2)")  # fmt: skip
    parser.add_argument("--batch-sizes", "--batch-size", type=_ints, default=(1,),
                        metavar="B,B,...", help="requests run together, e.g. 1,4,16 "
                        "(each <= --max-num-seqs; default: 1)")  # fmt: skip
    parser.add_argument("--num-iters", type=int, default=3, help="measured runs per batch size")
    parser.add_argument("--num-iters-warmup", type=int, default=1,
                        help="unmeasured runs per batch size before them")  # fmt: skip
    parser.add_argument("--ttft-input-lens", type=_ints, default=(), metavar="N,N,...",
                        help="also time batch-1 TTFT for prompts of these lengths, e.g. "
                        "128,512,2048 (each < --max-model-len)")  # fmt: skip
    parser.add_argument("--llama-cpp", default="auto", metavar="GGUF|auto|off",
                        help="run llama.cpp on this GGUF file side by side at batch 1 (auto: "
                        "the model's own GGUF when llama-cpp-python is installed)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None,
                        help="llama.cpp threads (default: the cores JAX uses)")  # fmt: skip
    add_out_argument(parser)
    add_engine_args(parser, defaults=ENGINE_DEFAULTS)


def validate(args: argparse.Namespace) -> None:
    """ValueErrors naming a flag whose value cannot give a measurement."""
    engine = engine_args_from(args)
    if args.input_len < 1 or args.output_len < 2:
        raise ValueError(f"--input-len must be >= 1 and --output-len >= 2 (one decode step at "
                         f"least), got {args.input_len} and {args.output_len}")  # fmt: skip
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        raise ValueError(f"--batch-sizes must be positive, got {args.batch_sizes}")
    if max(args.batch_sizes) > engine.max_num_seqs:
        raise ValueError(f"batch size {max(args.batch_sizes)} exceeds --max-num-seqs "
                         f"{engine.max_num_seqs}: the batch would not run together")  # fmt: skip
    if args.num_iters < 1 or args.num_iters_warmup < 0:
        raise ValueError(f"--num-iters must be >= 1 and --num-iters-warmup >= 0, got "
                         f"{args.num_iters} and {args.num_iters_warmup}")  # fmt: skip
    total = args.input_len + args.output_len
    if engine.max_model_len is not None and total > engine.max_model_len:
        raise ValueError(f"--input-len + --output-len = {total} exceeds --max-model-len "
                         f"{engine.max_model_len}")  # fmt: skip
    for n in args.ttft_input_lens:
        if n < 1 or (engine.max_model_len is not None and n >= engine.max_model_len):
            raise ValueError(f"--ttft-input-lens {n} must be in [1, --max-model-len "
                             f"{engine.max_model_len})")  # fmt: skip
    if args.llama_cpp not in ("auto", "off") and not Path(args.llama_cpp).is_file():
        raise ValueError(f"--llama-cpp {args.llama_cpp!r} is not a file (or auto / off)")


# ---- measurement ---------------------------------------------------------------------------
@dataclasses.dataclass
class BatchRun:
    """One run of a batch, times in seconds from submitting it."""

    ttfts: list[float]
    tpots: list[float]
    latency: float
    decode_seconds: float  # from the step giving the last first token to the end
    decode_steps: int  # engine steps in that span
    decode_shapes: list[list[tuple[int, int]]]  # per replica: (tokens, KV tokens) per step
    decode_host_seconds: float  # inside step() and not waiting for tokens, over the span


def run_batch(engine, prompts: list[list[int]], output_len: int) -> BatchRun:
    """Submits the prompts together and steps the engine until every request is done."""
    from xlaserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    with recording(engine) as recorders:
        start = time.perf_counter()
        ids = [engine.add_request(None, {"prompt_token_ids": p}, params) for p in prompts]
        first: dict[str, float] = {}
        done: dict[str, float] = {}
        decode_start = decode_steps = None  # set once every request has its first token
        mark: list[int] = []
        host_mark = 0.0
        # With async scheduling a step's shape is recorded one step before its tokens arrive.
        overlapped = any(getattr(e, "async_scheduling", False) for e in _engines(engine))
        while engine.has_unfinished_requests():
            before = [len(r.steps) for r in recorders]
            outputs = engine.step()
            now = time.perf_counter()
            for out in outputs:
                if out.outputs[0].token_ids:
                    first.setdefault(out.request_id, now)
                if out.finished:
                    done[out.request_id] = now
            if decode_start is not None:
                decode_steps += 1
            elif len(first) == len(ids):
                decode_start, decode_steps = now, 0
                mark = before if overlapped else [len(r.steps) for r in recorders]
                host_mark = host_seconds(engine)
        end = time.perf_counter()
    if decode_start is None or not decode_steps:
        raise RuntimeError(f"the batch never reached a decode step (first tokens for "
                           f"{len(first)} of {len(ids)} requests)")  # fmt: skip
    return BatchRun(
        ttfts=[first[i] - start for i in ids],
        tpots=[(done[i] - first[i]) / (output_len - 1) for i in ids],
        latency=end - start,
        decode_seconds=end - decode_start,
        decode_steps=decode_steps,
        decode_shapes=[r.steps[m:] for r, m in zip(recorders, mark, strict=True)],
        decode_host_seconds=host_seconds(engine) - host_mark,
    )


def host_seconds(engine) -> float:
    """Seconds the engine's steps spent on the host (not waiting for the device's tokens),
    summed over replicas."""
    return sum(e.step_seconds - e.runner.stats().wait_seconds for e in _engines(engine))


def random_prompts(vocab_size: int, batch_size: int, input_len: int, seed) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(10, vocab_size, input_len).tolist() for _ in range(batch_size)]


def measure_batch(engine, roofline: Roofline, *, batch_size: int, input_len: int,
                  output_len: int, num_iters: int, num_iters_warmup: int = 0,
                  seed: int = 0) -> dict:  # fmt: skip
    """One batch size's latencies and its decode steps against the roofline. The read
    bandwidth is measured again just before and after the batch's runs, and the highest of
    those and the roofline's own figure sets the ideal time (the strictest roofline)."""
    runs, probes = [], [read_bandwidth()]
    for i in range(num_iters_warmup + num_iters):
        prompts = random_prompts(engine.vocab_size, batch_size, input_len, [seed, batch_size, i])
        run = run_batch(engine, prompts, output_len)
        if i >= num_iters_warmup:
            runs.append(run)
    probes.append(read_bandwidth())
    bandwidth = max(roofline.read_bandwidth, *probes)
    roofline = dataclasses.replace(roofline, read_bandwidth=bandwidth)
    per_token = [r.decode_seconds / r.decode_steps for r in runs]
    host_ms = statistics.median(1e3 * r.decode_host_seconds / r.decode_steps for r in runs)
    median = sorted(runs, key=lambda r: r.latency)[len(runs) // 2]
    # Replicas step together: a step lasts as long as its slowest replica's.
    ideal = max(roofline.seconds(shapes) for shapes in median.decode_shapes)
    roof_ms = 1e3 * ideal / median.decode_steps
    fed = sum(n for shapes in median.decode_shapes for n, _ in shapes)
    attended = sum(kv for shapes in median.decode_shapes for _, kv in shapes)
    ms_per_token = 1e3 * statistics.median(per_token)
    return {
        "batch_size": batch_size,
        "iterations": len(runs),
        "ttft_ms": dist([t for r in runs for t in r.ttfts]),
        "tpot_ms": dist([t for r in runs for t in r.tpots]),
        "latency_ms": dist([r.latency for r in runs]),
        "ms_per_output_token": ms_per_token,
        "host_ms_per_step": host_ms,
        "all_ms_per_output_token": [1e3 * x for x in per_token],
        "decode_steps": median.decode_steps,
        "output_tokens_per_s": batch_size * output_len / median.latency,
        "context": attended / fed,  # mean KV tokens a sequence attends to per decode step
        "read_bandwidth_GBps": bandwidth / 1e9,
        "read_bandwidth_probes_GBps": [round(bw / 1e9, 2) for bw in probes],
        "roofline_ms_per_token": roof_ms,
        "percent_of_roofline": 100 * roof_ms / ms_per_token,
    }


def measured_roofline(llm, dtype: str) -> tuple[Roofline, dict]:
    """The engine's roofline with this device's measured bandwidth and matmul throughput."""
    bw, flops = read_bandwidth(), matmul_flops(dtype)
    roofline = Roofline.of_runner(runners(llm.engine)[0], bw, flops)
    return roofline, {"read_bandwidth_GBps": bw / 1e9, "matmul_TFLOPs": flops / 1e12,
                      "parameter_count_per_device": roofline.parameter_count,
                      "parameter_bytes_per_device": roofline.parameter_bytes,
                      "kv_bytes_per_token_per_device": roofline.kv_bytes_per_token}  # fmt: skip


def resolved_dtype(name: str) -> str:
    from xlaserve.checkpoints.loader import resolve_dtype

    return np.dtype(resolve_dtype(name)).name


def measure_ttft(engine, input_len: int, num_iters: int, seed: int) -> float:
    """Median batch-1 TTFT (ms) of fresh random prompts of `input_len` tokens."""
    from xlaserve import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    times = []
    for i in range(num_iters + 1):  # the first run is unmeasured
        [prompt] = random_prompts(engine.vocab_size, 1, input_len, [seed, input_len, i, 7])
        start = time.perf_counter()
        engine.add_request(None, {"prompt_token_ids": prompt}, params)
        while engine.has_unfinished_requests():
            engine.step()
        if i:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def llama_cpp_gguf(args, engine_args) -> tuple[Path | None, str]:
    """The GGUF file llama.cpp runs, or None and why not."""
    from xlaserve.checkpoints.presets import resolve_bundled

    if args.llama_cpp == "off":
        return None, "off (--llama-cpp off)"
    if not llama_cpp_peer.available():
        return None, "llama-cpp-python is not installed"
    if args.llama_cpp != "auto":
        return Path(args.llama_cpp), ""
    path = resolve_bundled(engine_args.model) or Path(engine_args.model)
    if path.suffix != ".gguf" or not path.is_file():
        return None, f"{engine_args.model} is not a GGUF file (pass --llama-cpp FILE)"
    return path, ""


def run_llama_cpp(args, engine_args, engine, result: dict) -> dict:
    """llama.cpp at batch 1 on the same prompts, next to our batch-1 figures."""
    gguf, why = llama_cpp_gguf(args, engine_args)
    if gguf is None:
        print(f"llama.cpp: not run: {why}")
        return {"ran": False, "reason": why}
    n_ctx = max([args.input_len + args.output_len, *[n + 2 for n in args.ttft_input_lens]])
    peer = llama_cpp_peer.LlamaCppPeer(gguf, n_ctx=n_ctx, threads=args.threads)
    prompts = [random_prompts(engine.vocab_size, 1, args.input_len, [engine_args.seed, 1, i])[0]
               for i in range(args.num_iters_warmup + args.num_iters)]  # fmt: skip
    peer.measure(prompts[: max(1, args.num_iters_warmup)], min(args.output_len, 8))  # warm-up
    measured = peer.measure(prompts[args.num_iters_warmup :], args.output_len)
    measured["ttft_by_input_len"] = [
        {"input_len": n, "ttft_ms": statistics.median(
            peer.ttft_ms(p) for p in random_prompts(engine.vocab_size, args.num_iters, n,
                                                      [engine_args.seed, n, 7]))}
        for n in args.ttft_input_lens
    ]  # fmt: skip
    ours = next((b for b in result["batches"] if b["batch_size"] == 1), None)
    if ours is not None:
        measured["ours_over_theirs_ms_per_token"] = (
            ours["ms_per_output_token"] / measured["ms_per_output_token"]
        )
    print(f"llama.cpp ({measured['threads']} threads): "
          f"{measured['ms_per_output_token']:.2f} ms per output token at batch 1, "
          f"TTFT {measured['ttft_ms']:.1f} ms")  # fmt: skip
    return {"ran": True, "gguf": gguf.name, **measured}


# ---- entry points --------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    validate(args)
    engine_args = engine_args_from(args)
    llm = build_llm(engine_args)
    dtype = resolved_dtype(engine_args.dtype)
    roofline, measured = measured_roofline(llm, dtype)
    result = {
        "benchmark": "latency", "date": today(), "device": device_name(),
        "model": engine_args.model, "load_format": engine_args.load_format, "dtype": dtype,
        "engine": dataclasses.asdict(engine_args), "input_len": args.input_len,
        "output_len": args.output_len, "num_iters": args.num_iters,
        "num_iters_warmup": args.num_iters_warmup, "measured": measured, "batches": [],
    }  # fmt: skip
    for b in args.batch_sizes:
        batch = measure_batch(llm.engine, roofline, batch_size=b, input_len=args.input_len,
                              output_len=args.output_len, num_iters=args.num_iters,
                              num_iters_warmup=args.num_iters_warmup,
                              seed=engine_args.seed)  # fmt: skip
        result["batches"].append(batch)
        print(one_line(batch), flush=True)
    result["ttft_by_input_len"] = [
        {"input_len": n, "ttft_ms": measure_ttft(llm.engine, n, args.num_iters, engine_args.seed)}
        for n in args.ttft_input_lens
    ]
    result["llama_cpp"] = run_llama_cpp(args, engine_args, llm.engine, result)
    m = llm.get_metrics()
    result.update({k: m[k] for k in ("compiles", "compiles_after_warmup", "warmup_seconds")})
    sizes = "-".join(str(b) for b in args.batch_sizes)
    # The storage options in the name, so runs of one model in several modes keep their files.
    storage = f"-{engine_args.quantization}" if engine_args.quantization else ""
    if engine_args.kv_cache_dtype != "auto":
        storage += f"-kv-{engine_args.kv_cache_dtype}"
    device = slug(result["device"])
    stem = (f"latency-{Path(engine_args.model).name}{storage}-in{args.input_len}"
            f"out{args.output_len}-bs{sizes}-{dtype}-{device}-{result['date']}")  # fmt: skip
    path = write_results(args.out, stem, result, markdown(result))
    print(markdown(result))
    print(f"wrote {path.with_suffix('')}.{{json,md}}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return validated_main(add_arguments, validate, run, prog="xlaserve bench latency",
                          doc=__doc__, argv=argv)  # fmt: skip


# ---- reporting -----------------------------------------------------------------------------
def _ppp(d: dict) -> str:
    return "/".join(f"{d[k]:.1f}" for k in ("p50", "p90", "p99"))


def one_line(b: dict) -> str:
    return (f"batch {b['batch_size']:>3}: TTFT p50 {b['ttft_ms']['p50']:.1f} ms, "
            f"{b['ms_per_output_token']:.2f} ms per output token "
            f"(host {b['host_ms_per_step']:.2f} ms per step) "
            f"({b['percent_of_roofline']:.0f}% of roofline), "
            f"{b['output_tokens_per_s']:.1f} output tok/s")  # fmt: skip


def weights_note(r: dict) -> str:
    """The title's note on quantized weights (", quantization gguf"), empty without."""
    quantization = r.get("engine", {}).get("quantization")
    return f", quantization {quantization}" if quantization else ""


def markdown(r: dict) -> str:
    lines = [
        f"# Latency: {r['model']} ({r['dtype']}{weights_note(r)}, {r['load_format']}) on "
        f"{r['device']}, "
        f"{r['date']}", "",
        f"Prompts of {r['input_len']} random tokens, exactly {r['output_len']} output tokens "
        f"each (greedy, ignore_eos), the batch submitted together; {r['num_iters']} measured "
        f"runs per batch size after {r['num_iters_warmup']} warm-up. Measured read bandwidth "
        f"{r['measured']['read_bandwidth_GBps']:.1f} GB/s at the start (the fastest of ten "
        f"reads; each batch is also probed just before and after its runs, and its roofline "
        f"uses the highest reading, shown per batch), {r['dtype']} matmul "
        f"{r['measured']['matmul_TFLOPs']:.3f} TFLOP/s. Times in ms, p50/p90/p99.", "",
        f"Async scheduling: {'on' if r['engine'].get('async_scheduling') else 'off'}.", "",
        "| batch | TTFT | ms per output token (decode) | host ms per step | read GB/s "
        "| roofline ms | % of roofline | TPOT | latency | output tok/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for b in r["batches"]:
        lines.append(
            f"| {b['batch_size']} | {_ppp(b['ttft_ms'])} | {b['ms_per_output_token']:.2f} | "
            f"{b['host_ms_per_step']:.2f} | {b.get('read_bandwidth_GBps', 0):.1f} | "
            f"{b['roofline_ms_per_token']:.2f} | {b['percent_of_roofline']:.0f}% | "
            f"{_ppp(b['tpot_ms'])} | {_ppp(b['latency_ms'])} | {b['output_tokens_per_s']:.1f} |"
        )
    peer = r.get("llama_cpp") or {"ran": False, "reason": "not asked"}
    ttft = {t["input_len"]: t["ttft_ms"] for t in r.get("ttft_by_input_len", [])}
    if ttft:
        theirs = {t["input_len"]: t["ttft_ms"] for t in peer.get("ttft_by_input_len", [])}
        lines += ["", "| prompt tokens | TTFT ms (batch 1) | llama.cpp TTFT ms |", "|---|---|---|"]
        lines += [f"| {n} | {ms:.1f} | {theirs[n]:.1f} |" if n in theirs else
                  f"| {n} | {ms:.1f} | - |" for n, ms in ttft.items()]  # fmt: skip
    if peer["ran"]:
        ratio = peer.get("ours_over_theirs_ms_per_token")
        lines += [
            "",
            f"llama.cpp {peer['version']} on {peer['gguf']} ({peer['threads']} "
            f"threads), batch 1, same prompts: {peer['ms_per_output_token']:.2f} ms per "
            f"output token, TTFT {peer['ttft_ms']:.1f} ms"
            + ("" if ratio is None else f"; ours / theirs per token: {ratio:.2f}x")
            + ".",
        ]
    else:
        lines += ["", f"llama.cpp: not run ({peer['reason']})."]
    lines += ["", f"Compiles: {r['compiles']} at warm-up, {r['compiles_after_warmup']} after."]
    return "\n".join(lines) + "\n"
