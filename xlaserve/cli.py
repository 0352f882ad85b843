"""Command line: `xlaserve generate | convert`."""

import argparse
import sys
import time

from xlaserve.checkpoints.presets import DEFAULT_MODEL


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="bundled name, HF folder, .gguf, orbax")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument(
        "--load-format", default="auto", choices=("auto", "hf", "gguf", "orbax", "dummy")
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from xlaserve.checkpoints.loader import load_model
    from xlaserve.models.generate import greedy_generate

    t0 = time.perf_counter()
    loaded = load_model(args.model, load_format=args.load_format, dtype=args.dtype)
    if loaded.tokenizer is None:
        raise SystemExit(f"error: model {args.model!r} has no tokenizer to encode the prompt")
    tok = loaded.tokenizer
    if args.chat:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True
        )
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        ids = tok(args.prompt)["input_ids"]
    t1 = time.perf_counter()
    out = greedy_generate(
        loaded.model, [ids], args.max_tokens, stop_token_ids=loaded.config.eos_token_ids
    )[0]
    t2 = time.perf_counter()
    print(args.prompt + tok.decode(out, skip_special_tokens=True))
    print(
        f"[{loaded.source}: {len(ids)} prompt + {len(out)} generated tokens; "
        f"load {t1 - t0:.1f}s, generate {t2 - t1:.1f}s]",
        file=sys.stderr,
    )
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from xlaserve.checkpoints import orbax_store
    from xlaserve.checkpoints.loader import load_model, resolve_dtype

    t0 = time.perf_counter()
    loaded = load_model(args.model, load_format=args.load_format, dtype=args.dtype)
    out = orbax_store.save(
        loaded.model,
        loaded.tokenizer,
        args.out,
        dtype=resolve_dtype(args.dtype),
        source=loaded.source,
    )
    print(f"converted {loaded.source} -> {out} in {time.perf_counter() - t0:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xlaserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="greedy continuation of a prompt")
    add_model_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.set_defaults(func=cmd_generate)

    conv = sub.add_parser("convert", help="store converted parameters with orbax")
    add_model_args(conv)
    conv.add_argument("--out", required=True, help="new (or empty) output folder")
    conv.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
