"""Offline throughput of xlaserve vs HF transformers `generate`, side by side in one run, with
the roofline each run is measured against.

Workloads (`--workload`):
  text          32 short English prompts (issue 3's CPU comparison; default)
  fixed:IN/OUT  random token-id prompts of IN tokens, exactly OUT new tokens each
  sharegpt      a long-tailed synthetic mix (~200 in / ~180 out on average)

Every request generates exactly its output length (ignore_eos on both sides). transformers runs
at each dtype of --hf-dtypes (default float32 and bfloat16), so the table shows the ratio against
its default (float32) and at matched precision. Roofline: each
step must read the weights plus the live KV cache (bytes / measured read bandwidth) and do
2 * params FLOPs per token (FLOPs / measured matmul throughput); the ideal time of a run is the
sum over its steps of the larger of the two. Batch-1 decode is reported in ms/token against its
roofline. Start-up (warm-up with an empty and with a filled compilation cache, each in a fresh
process) is measured with --startup.

    .venv/bin/python benchmarks/throughput.py --startup                 # issue 3, CPU
    .venv/bin/python benchmarks/throughput.py --model llama-3-8b --load-format dummy \\
        --dtype bfloat16 --workload sharegpt --num-prompts 1000 --max-num-seqs 256 \\
        --max-num-batched-tokens 2048 --max-model-len 4096             # issue 8, one GPU
"""

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from roofline import device_name, matmul_flops, read_bandwidth  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TOPICS = [
    "the history of the printing press", "how volcanoes form", "the rules of chess",
    "why the sky is blue", "the life cycle of a butterfly", "how vaccines work",
    "the causes of the French Revolution", "how a transistor works", "the water cycle",
    "the plot of Hamlet", "how to bake bread", "the theory of evolution",
    "how airplanes fly", "the Roman Empire", "how the internet routes packets",
    "photosynthesis", "black holes", "the game of cricket", "how batteries store energy",
    "the Great Wall of China", "how compilers work", "the migration of birds",
    "the invention of the telephone", "plate tectonics", "how coffee is grown",
    "the Apollo program", "how a bill becomes law", "the structure of DNA",
    "how glaciers move", "the origins of jazz", "how bees make honey", "the Silk Road",
]  # fmt: skip


def workload(spec: str, n: int, vocab: int, tokenizer, seed: int = 0):
    """(prompt token ids, output lengths) for the workload spec."""
    rng = np.random.default_rng(seed)
    if spec == "text":
        if tokenizer is None:
            raise ValueError("the text workload needs a model with a tokenizer")
        texts = [f"Write a short paragraph about {TOPICS[i % len(TOPICS)]}." for i in range(n)]
        return [tokenizer(t)["input_ids"] for t in texts], None
    if spec.startswith("fixed:"):
        inp, out = (int(x) for x in spec.split(":", 1)[1].split("/"))
        return [rng.integers(10, vocab, inp).tolist() for _ in range(n)], [out] * n
    if spec == "sharegpt":
        ins = np.clip(rng.lognormal(np.log(140), 0.8, n), 4, 1024).astype(int)
        outs = np.clip(rng.lognormal(np.log(130), 0.8, n), 4, 1024).astype(int)
        return [rng.integers(10, vocab, k).tolist() for k in ins], outs.tolist()
    raise ValueError(f"unknown workload {spec!r}")


def run_xlaserve(llm, prompts, out_lens, default_out: int, repeats: int) -> dict:
    """Drives the engine step by step, recording live KV tokens and new tokens per step."""
    from xlaserve import SamplingParams

    engine = llm.engine
    out_lens = out_lens or [default_out] * len(prompts)
    runs = []
    execute = engine.runner.execute
    for _ in range(repeats):
        steps = []  # (tokens in the step, KV tokens attended to after it)

        def recording(out, steps=steps):
            live = sum(s.start_pos + len(s.token_ids) for s in out.scheduled)
            steps.append((out.num_batched_tokens, live))
            return execute(out)

        engine.runner.execute = recording
        start = time.perf_counter()
        for ids, n in zip(prompts, out_lens, strict=True):
            params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
            engine.add_request(None, {"prompt_token_ids": ids}, params)
        generated = 0
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    generated += sum(len(c.token_ids) for c in out.outputs)
        runs.append((time.perf_counter() - start, generated, steps))
        engine.runner.execute = execute
    seconds, generated, steps = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    m = llm.get_metrics()
    return {
        "seconds": seconds,
        "all_seconds": [r[0] for r in runs],
        "output_tokens": generated,
        "output_tokens_per_s": generated / seconds,
        "requests_per_s": len(prompts) / seconds,
        "steps": steps,
        "compiles": m["compiles"],
        "compiles_after_warmup": m["compiles_after_warmup"],
        "warmup_seconds": m["warmup_seconds"],
    }


def batch1_decode(llm, vocab: int, in_len: int = 128, out_len: int = 128) -> dict:
    from xlaserve import SamplingParams

    engine = llm.engine
    ids = np.random.default_rng(1).integers(10, vocab, in_len).tolist()
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    engine.add_request(None, {"prompt_token_ids": ids}, params)
    engine.step()  # prefill (and the first token)
    start = time.perf_counter()
    n = 0
    while engine.has_unfinished_requests():
        engine.step()
        n += 1
    return {"ms_per_token": 1e3 * (time.perf_counter() - start) / n, "context": in_len + out_len}


def roofline_seconds(steps, param_bytes, kv_bytes_per_token, params, bw, flops) -> float:
    total = 0.0
    for new_tokens, live in steps:
        memory = (param_bytes + live * kv_bytes_per_token) / bw
        compute = 2 * params * new_tokens / flops
        total += max(memory, compute)
    return total


def run_transformers(args, prompts, out_lens, dtype_name: str) -> dict:
    """HF generate on the same prompts (left-padded batches of --hf-batch), greedy."""
    import torch
    from transformers import AutoModelForCausalLM

    from xlaserve.checkpoints.presets import resolve_bundled

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.load_format == "dummy":
        model = hf_dummy(args.model, dtype).to(device)
    else:
        path = resolve_bundled(args.model)
        kw = dict(gguf_file=path.name) if path else {}
        folder = str(path.parent) if path else args.model
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw).to(device).eval()
    out_lens = out_lens or [args.output_len] * len(prompts)
    cache = "static" if device == "cuda" else None
    with torch.no_grad():
        start = time.perf_counter()
        generated = 0
        for i in range(0, len(prompts), args.hf_batch):
            batch, outs = prompts[i : i + args.hf_batch], out_lens[i : i + args.hf_batch]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch],
                                device=device)  # fmt: skip
            n = max(outs)
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, cache_implementation=cache,
                           pad_token_id=0)  # fmt: skip
            generated += sum(outs)  # tokens the requests asked for (HF pads shorter ones)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "output_tokens": generated, "dtype": dtype_name,
            "output_tokens_per_s": generated / seconds, "device": device,
            "cache_implementation": cache or "dynamic"}  # fmt: skip


def hf_dummy(preset: str, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from xlaserve.models.registry import preset_config

    _, c = preset_config(preset)
    if c.architecture != "LlamaForCausalLM":
        raise ValueError("HF comparison with dummy weights supports Llama presets")
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                         intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                         num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                         head_dim=c.head_dim, rope_theta=c.rope_theta,
                         max_position_embeddings=c.max_position_embeddings,
                         tie_word_embeddings=c.tie_word_embeddings)  # fmt: skip
    return LlamaForCausalLM(config).to(dtype).eval()


def startup(args, cache_dir: str, engine_kw: dict) -> dict:
    code = (
        "import json, time; t = time.perf_counter()\n"
        "from xlaserve import LLM\n"
        f"llm = LLM({args.model!r}, dtype={args.dtype!r}, load_format={args.load_format!r}, "
        f"compilation_cache_dir={cache_dir!r}, **{engine_kw!r})\n"
        "m = llm.get_metrics()\n"
        "print(json.dumps({'ready_seconds': time.perf_counter() - t, "
        "'warmup_seconds': m['warmup_seconds'], 'compiles': m['compiles']}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--load-format", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--hf-dtypes", default="float32,bfloat16", help="comma-separated")
    p.add_argument("--workload", default="text")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64, help="for the text workload")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=256)
    p.add_argument("--hf-batch", type=int, default=32)
    p.add_argument("--startup", action="store_true", help="measure cold and warm start-up")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--no-batch1", action="store_true")
    args = p.parse_args()

    from xlaserve import LLM
    from xlaserve.checkpoints.loader import resolve_dtype

    engine_kw = dict(max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                     max_num_batched_tokens=args.max_num_batched_tokens)  # fmt: skip
    result = {"benchmark": "offline throughput", "date": datetime.date.today().isoformat(),
              "device": device_name(), "model": args.model, "load_format": args.load_format,
              "dtype": args.dtype, "workload": args.workload, "num_prompts": args.num_prompts,
              "engine": engine_kw}  # fmt: skip
    if args.startup:
        with tempfile.TemporaryDirectory() as cache:
            result["startup_cold"] = startup(args, cache, engine_kw)
            result["startup_warm"] = startup(args, cache, engine_kw)
    llm = LLM(args.model, dtype=args.dtype, load_format=args.load_format, **engine_kw)
    dtype = np.dtype(resolve_dtype(args.dtype)).name
    result["dtype"] = dtype
    c = llm.engine.runner.steps
    leaves = __import__("jax").tree.leaves(c.params)
    params = sum(int(np.prod(x.shape)) for x in leaves)
    param_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)
    cache_shape = c.kv_cache.shape  # [L, P, ps, 2K, H]
    kv_per_token = cache_shape[0] * cache_shape[3] * cache_shape[4] * c.kv_cache.dtype.itemsize
    vocab = llm.engine.vocab_size
    prompts, out_lens = workload(args.workload, args.num_prompts, vocab, llm.get_tokenizer())
    bw, flops = read_bandwidth(), matmul_flops(dtype)
    result["measured"] = {"read_bandwidth_GBps": bw / 1e9, "matmul_TFLOPs": flops / 1e12}
    ours = run_xlaserve(llm, prompts, out_lens, args.output_len, args.repeats)
    ideal = roofline_seconds(ours.pop("steps"), param_bytes, kv_per_token, params, bw, flops)
    ours["roofline_seconds"] = ideal
    ours["percent_of_roofline"] = 100 * ideal / ours["seconds"]
    result["xlaserve"] = ours
    if not args.no_batch1:
        b1 = batch1_decode(llm, vocab)
        roof = (param_bytes + b1["context"] * kv_per_token) / bw * 1e3
        b1.update(roofline_ms_per_token=roof, percent_of_roofline=100 * roof / b1["ms_per_token"])
        result["batch1_decode"] = b1
    if not args.no_hf:
        del llm  # free the engine's memory for transformers
        for hf_dtype in args.hf_dtypes.split(","):
            hf = run_transformers(args, prompts, out_lens, hf_dtype)
            hf["ratio"] = ours["output_tokens_per_s"] / hf["output_tokens_per_s"]
            result.setdefault("transformers", []).append(hf)
    RESULTS.mkdir(exist_ok=True)
    slug = result["device"].split(" (")[0].replace(" ", "-")
    stem = f"throughput-{Path(args.model).name}-{args.workload.replace(':', '').replace('/', 'x')}"
    stem += f"-{dtype}-{slug}-{result['date']}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    x, hfs = r["xlaserve"], r.get("transformers", [])
    ratios = " / ".join(f"{hf['ratio']:.2f}x {hf['dtype']}" for hf in hfs) or "-"
    lines = [
        f"# Throughput: {r['model']} ({r['dtype']}, {r['load_format']}) on {r['device']}, "
        f"{r['date']}", "",
        f"Workload {r['workload']}, {r['num_prompts']} prompts, greedy, every request runs to "
        f"its output length. Measured read bandwidth {r['measured']['read_bandwidth_GBps']:.1f} "
        f"GB/s, {r['dtype']} matmul {r['measured']['matmul_TFLOPs']:.3f} TFLOP/s.", "",
        "| engine | dtype | seconds | output tok/s | req/s | % of roofline | xlaserve ÷ this |",
        "|---|---|---|---|---|---|---|",
        f"| xlaserve | {r['dtype']} | {x['seconds']:.2f} | {x['output_tokens_per_s']:.1f} | "
        f"{x['requests_per_s']:.2f} | {x['percent_of_roofline']:.0f}% | {ratios} |",
    ]  # fmt: skip
    for hf in hfs:
        lines.append(
            f"| transformers generate ({hf['cache_implementation']} cache) | {hf['dtype']} | "
            f"{hf['seconds']:.2f} | {hf['output_tokens_per_s']:.1f} | - | - | "
            f"{hf['ratio']:.2f}x |"
        )
    lines += ["", f"Compiles: {x['compiles']} at warm-up, {x['compiles_after_warmup']} after."]
    if "batch1_decode" in r:
        b = r["batch1_decode"]
        lines.append(
            f"Batch-1 decode: {b['ms_per_token']:.2f} ms/token (roofline "
            f"{b['roofline_ms_per_token']:.2f} ms, {b['percent_of_roofline']:.0f}%)."
        )
    for key in ("startup_cold", "startup_warm"):
        if key in r:
            s = r[key]
            lines.append(f"Start-up ({key.split('_')[1]} compilation cache): ready in "
                         f"{s['ready_seconds']:.1f}s, warm-up {s['warmup_seconds']:.1f}s "
                         f"({s['compiles']} compiles).")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
