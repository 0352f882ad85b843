"""Vision-language serving on a SmolVLM or Qwen2.5-VL checkpoint (--family) assembled from the
bundled SmolLM2 text weights and a seeded vision tower (`xlaserve.multimodal.synthetic`;
--model to use a real SmolVLM / Idefics3 / Qwen2.5-VL folder instead):

- time to first token for one image + a short prompt, with the image new (encoder cache miss)
  and the same image again (encoder cache hit; prefix caching off so the prompt is
  recomputed), against the same prompt without an image;
- requests/s and output tokens/s for a mixed load (half the requests with a distinct image);
- compiles after warm-up over all of it (the encoder's tile or patch buckets cover every
  size).

    xlaserve bench multimodal --family qwen2.5-vl --vision small --num-requests 16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time

import numpy as np

from xlaserve.bench.common import add_out_argument, slug, today, write_results
from xlaserve.bench.roofline import device_name
from xlaserve.cli_args import add_engine_args, engine_args_from

PROMPT = "Describe this picture in one sentence."
BUILDERS = {"smolvlm": "build_smolvlm", "qwen2.5-vl": "build_qwen_vl"}
MODEL_NAMES = {
    "smolvlm": "SmolVLM (SmolLM2-135M text + seeded vision tower)",
    "qwen2.5-vl": "Qwen2.5-VL (SmolLM2-135M weights in its decoder + seeded vision tower)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_args(p, defaults=dict(model=None, dtype="float32", max_model_len=1024,
                                     max_num_seqs=8, max_num_batched_tokens=512,
                                     enable_prefix_caching=False))  # fmt: skip
    p.add_argument(
        "--family",
        default="smolvlm",
        choices=sorted(BUILDERS),
        help="the assembled checkpoint's family (ignored with --model)",
    )
    p.add_argument(
        "--vision",
        default="small",
        help="vision tower preset of the assembled "
        "checkpoint: small, or smolvlm-256m / qwen2.5-vl-3b (ignored with --model)",
    )
    p.add_argument("--repeats", type=int, default=3, help="TTFT rounds (median)")
    p.add_argument("--num-requests", type=int, default=16, help="mixed-load requests")
    p.add_argument("--output-len", type=int, default=32, help="mixed-load output tokens")
    p.add_argument("--image-size", default="480x360", help="WIDTHxHEIGHT of the images")
    p.add_argument("--note", default="the CPU is shared with other work while measuring; "
                   "compare the ratios within this run", help="machine state")  # fmt: skip
    add_out_argument(p)


def make_image(size: tuple[int, int], seed: int):
    import PIL.Image

    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def chat(image=None) -> list[dict]:
    parts = [{"type": "text", "text": PROMPT}]
    if image is not None:
        parts.insert(0, {"type": "image", "image": image})
    return [{"role": "user", "content": parts}]


def same_length_text(llm, num_tokens: int) -> list[dict]:
    """A text-only conversation of about `num_tokens` prompt tokens (words repeated)."""
    tok = llm.get_tokenizer()
    filler = tok((PROMPT + " ") * num_tokens, add_special_tokens=False)["input_ids"]
    base = len(llm.engine.intake.process("n", {"messages": chat()}, None,
                                         arrival_time=0.0).prompt_token_ids)  # fmt: skip
    text = tok.decode(filler[: max(num_tokens - base, 1)])
    return [{"role": "user", "content": text + " " + PROMPT}]


def ttft(llm, messages) -> float:
    from xlaserve import SamplingParams

    start = time.perf_counter()
    llm.chat(messages, SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    return time.perf_counter() - start


def run(a: argparse.Namespace) -> int:
    from xlaserve import LLM, SamplingParams
    from xlaserve.multimodal import synthetic

    args = engine_args_from(a)
    tmp = None
    if args.model is None:
        tmp = tempfile.TemporaryDirectory()
        build_s = time.perf_counter()
        build = getattr(synthetic, BUILDERS[a.family])
        args = dataclasses.replace(args, model=str(build(tmp.name, a.vision)))
        build_s = time.perf_counter() - build_s
    size = tuple(int(x) for x in a.image_size.split("x"))
    start = time.perf_counter()
    llm = LLM(**dataclasses.asdict(args))
    startup_s = time.perf_counter() - start
    vision = llm.engine.runner.vision
    seed = iter(range(1, 10**6))
    ttft(llm, chat(make_image(size, next(seed))))  # unmeasured first round
    probe = llm.engine.intake.process("probe", {"messages": chat(make_image(size, 0))}, None,
                                      arrival_time=0.0)  # fmt: skip
    long_text = same_length_text(llm, len(probe.prompt_token_ids))
    miss, hit, text, text_long = [], [], [], []
    for _ in range(a.repeats):
        img = make_image(size, next(seed))
        miss.append(ttft(llm, chat(img)))
        hit.append(ttft(llm, chat(img)))
        text.append(ttft(llm, chat()))
        text_long.append(ttft(llm, long_text))
    tiles = probe.mm_items[0]
    mixed = [chat(make_image(size, next(seed)) if i % 2 == 0 else None)
             for i in range(a.num_requests)]  # fmt: skip
    params = SamplingParams(max_tokens=a.output_len, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.chat(mixed, params, use_tqdm=False)
    mixed_s = time.perf_counter() - start
    metrics = llm.get_metrics()
    med = statistics.median
    result = {
        "benchmark": "multimodal",
        "model": MODEL_NAMES[a.family] if tmp else args.model,
        "vision": a.vision if tmp else "checkpoint",
        "device": device_name(),
        "date": today(),
        "dtype": args.dtype,
        "image_size": a.image_size,
        "image_layout": layout(tiles),
        "image_tokens": tiles.num_features,
        "encoder_buckets": list(vision.buckets),
        "encoder_bucket_kind": vision.bucket_kind,
        "ttft_s": {
            "image_encoder_miss": med(miss),
            "image_encoder_hit": med(hit),
            "text_only": med(text),
            "text_same_length": med(text_long),
        },  # fmt: skip
        "prompt_tokens_with_image": len(probe.prompt_token_ids),
        "ttft_rounds_s": {"miss": miss, "hit": hit, "text": text, "text_same_length": text_long},
        "encoder_miss_over_hit": med(miss) / med(hit),
        "mixed": {
            "requests": a.num_requests,
            "with_image": (a.num_requests + 1) // 2,
            "output_len": a.output_len,
            "seconds": mixed_s,
            "requests_per_s": a.num_requests / mixed_s,
            "output_tokens_per_s": sum(len(o.outputs[0].token_ids) for o in outs) / mixed_s,
        },  # fmt: skip
        "encoder_cache": {"hits": vision.hits, "misses": vision.misses},
        "startup_s": startup_s,
        "checkpoint_build_s": build_s if tmp else None,
        "warmup_s": metrics["warmup_seconds"],
        "compiles": metrics["compiles"],
        "compiles_after_warmup": metrics["compiles_after_warmup"],
        "engine": {
            k: getattr(args, k)
            for k in (
                "max_model_len",
                "max_num_seqs",
                "max_num_batched_tokens",
                "enable_prefix_caching",
            )
        },  # fmt: skip
        "note": a.note,
    }
    family = a.family if tmp else "checkpoint"
    stem = f"multimodal-{family}-{a.vision}-{slug(result['device'])}-{today()}"
    path = write_results(a.out, stem, result, markdown(result))
    print(json.dumps(result, indent=2))
    print(f"wrote {path.with_suffix('')}.{{json,md}}")
    if tmp is not None:
        tmp.cleanup()
    return 0


def layout(item) -> str:
    """An image's processed form: SmolVLM tiles, or Qwen2.5-VL's merged patch grid."""
    if item.grid is None:
        return f"{item.num_tiles} tile(s)"
    t, h, w = item.grid
    return f"{h} x {w} merged patches ({4 * t * h * w} patches)"


def markdown(r: dict) -> str:
    t, m = {k: f"{1e3 * v:.0f}" for k, v in r["ttft_s"].items()}, r["mixed"]
    return "\n".join([
        f"# Multimodal: {r['model']}, vision {r['vision']}, on {r['device']}, {r['date']}",
        "",
        f"{r['dtype']}; images {r['image_size']} -> {r['image_layout']}, "
        f"{r['image_tokens']} image tokens; encoder buckets ({r['encoder_bucket_kind']}) "
        f"{r['encoder_buckets']}; "
        f"engine {r['engine']}. {r['note']}.",
        "",
        "| time to first token (median) | ms |",
        "|---|---|",
        f"| one image + short prompt, new image (encoder runs) | {t['image_encoder_miss']} |",
        f"| same image again (encoder cache hit, prompt recomputed) | {t['image_encoder_hit']} |",
        f"| the short prompt without an image | {t['text_only']} |",
        f"| a text prompt as long as the image prompt ({r['prompt_tokens_with_image']} tokens) "
        f"| {t['text_same_length']} |",
        "",
        f"Encoder cache miss / hit TTFT: {r['encoder_miss_over_hit']:.2f}x.",
        "",
        f"Mixed load: {m['requests']} chat requests ({m['with_image']} with a distinct image), "
        f"{m['output_len']} output tokens each: {m['requests_per_s']:.2f} requests/s, "
        f"{m['output_tokens_per_s']:.1f} output tokens/s ({m['seconds']:.1f} s).",
        "",
        f"Compiles: {r['compiles']} at warm-up ({r['warmup_s']:.1f} s), "
        f"{r['compiles_after_warmup']} after.",
        "",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="xlaserve bench multimodal", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(p)
    return run(p.parse_args(argv))
