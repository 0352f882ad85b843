"""Command line: `xlaserve generate | chat | convert | serve | parity`."""

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


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        model=args.model,
        dtype=args.dtype,
        load_format=args.load_format,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
    )


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)


def cmd_generate(args: argparse.Namespace) -> int:
    from xlaserve import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs(args))
    params = SamplingParams(
        temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed
    )
    t1 = time.perf_counter()
    if args.chat:
        conversation = [{"role": "user", "content": args.prompt}]
        out = llm.chat(conversation, params, use_tqdm=False)[0]
        print(out.outputs[0].text)
    else:
        out = llm.generate(args.prompt, params, use_tqdm=False)[0]
        print(args.prompt + out.outputs[0].text)
    t2 = time.perf_counter()
    m = llm.get_metrics()
    print(
        f"[{args.model}: {len(out.prompt_token_ids)} prompt + {len(out.outputs[0].token_ids)} "
        f"generated tokens ({out.outputs[0].finish_reason}); start-up {t1 - t0:.1f}s "
        f"(warm-up {m['warmup_seconds']:.1f}s, {m['compiles']} compiles), "
        f"generate {t2 - t1:.2f}s]",
        file=sys.stderr,
    )
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """An interactive REPL that streams the assistant's tokens as they are generated."""
    from xlaserve import SamplingParams
    from xlaserve.config import EngineArgs
    from xlaserve.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_engine_args(EngineArgs(**engine_kwargs(args)))
    tok = engine.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise ValueError(f"model {args.model!r} has no chat template")
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print(
        "xlaserve chat: empty line or Ctrl-D to quit, /reset to clear the history", file=sys.stderr
    )
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            del history[int(bool(args.system)) :]
            continue
        history.append({"role": "user", "content": line})
        text = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
        rid = engine.add_request(None, {"prompt": text, "prompt_token_ids": ids}, params)
        print("assistant> ", end="", flush=True)
        shown, reply = 0, ""
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == rid:
                    reply = out.outputs[0].text
                    print(reply[shown:], end="", flush=True)
                    shown = len(reply)
        print()
        history.append({"role": "assistant", "content": reply})
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


def cmd_serve(args: argparse.Namespace) -> int:
    """gRPC + OpenAI HTTP servers until SIGTERM/SIGINT (exit 0) or an engine failure (exit 1)."""
    from xlaserve.config import EngineArgs
    from xlaserve.serving.server import ServerConfig, run_server

    options = {
        "model": args.model,
        "dtype": args.dtype,
        "load_format": args.load_format,
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_waiting_requests": args.max_waiting_requests,
        "kv_cache_memory": args.kv_cache_memory,
        "scheduling_policy": args.scheduling_policy,
        "enable_prefix_caching": args.enable_prefix_caching,
        "seed": args.seed,
        "tensor_parallel_size": args.tensor_parallel_size,
        "data_parallel_size": args.data_parallel_size,
    }
    engine_args = EngineArgs(**{k: v for k, v in options.items() if v is not None})
    if args.coordinator_address:
        from xlaserve.sharding import distributed

        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
        if args.process_id != 0:  # followers run the leader's steps; only process 0 serves
            from xlaserve.engine.llm_engine import run_follower

            run_follower(engine_args)
            return 0
    config = ServerConfig(
        host=args.host,
        grpc_port=None if args.grpc_port < 0 else args.grpc_port,
        http_port=None if args.http_port < 0 else args.http_port,
        api_key=args.api_key,
        served_model_name=args.served_model_name,
        max_body_bytes=args.max_body_bytes,
        drain_timeout_s=args.drain_timeout,
    )
    try:
        return run_server(engine_args, config)
    except OSError as e:  # e.g. a port in use
        print(f"error: {e}", file=sys.stderr)
        return 2


def _memory(value: str) -> int | float:
    """--kv-cache-memory: bytes (an int) or a fraction of free memory (a float in (0, 1])."""
    return float(value) if "." in value else int(value)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=50051, help="0: any free port; -1: off")
    p.add_argument("--http-port", type=int, default=8000, help="0: any free port; -1: off")
    p.add_argument("--api-key", default=None, help="required as 'Bearer <key>' except on health")
    p.add_argument("--served-model-name", default=None, help="model name clients send")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-waiting-requests", type=int, default=None,
                   help="refuse more (RESOURCE_EXHAUSTED / HTTP 503)")  # fmt: skip
    p.add_argument("--kv-cache-memory", type=_memory, default=None)
    p.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default=None)
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   default=None)  # fmt: skip
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--tensor-parallel-size", type=int, default=None)
    p.add_argument("--data-parallel-size", type=int, default=None)
    p.add_argument(
        "--coordinator-address",
        default=None,
        help="multi-host: HOST:PORT of process 0 (every process passes the same)",
    )
    p.add_argument("--num-processes", type=int, default=1, help="multi-host: processes in all")
    p.add_argument("--process-id", type=int, default=0, help="multi-host: this process (0..N-1)")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20)
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on shutdown")  # fmt: skip


def cmd_parity(args: argparse.Namespace) -> int:
    """JAX vs torch on the same checkpoint; exit 1 when logits differ beyond the tolerance."""
    from xlaserve.kernels_cuda.parity import read_prompts, run_parity

    report = run_parity(
        args.model,
        prompts=read_prompts(args.prompts) if args.prompts else None,
        dtype=args.dtype,
        max_tokens=args.max_tokens,
        load_format=args.load_format,
        device=args.device,
        attention=args.attention,
    )
    print(report.format())
    return 0 if report.passed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xlaserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a continuation of one prompt")
    add_model_args(gen)
    add_engine_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat REPL with streamed replies")
    add_model_args(chat)
    add_engine_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.set_defaults(func=cmd_chat)

    conv = sub.add_parser("convert", help="store converted parameters with orbax")
    add_model_args(conv)
    conv.add_argument("--out", required=True, help="new (or empty) output folder")
    conv.set_defaults(func=cmd_convert)

    serve = sub.add_parser("serve", help="gRPC (+ JetStream) and OpenAI HTTP servers")
    add_model_args(serve)
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)

    par = sub.add_parser("parity", help="compare the JAX and torch backends' logits")
    par.add_argument("--model", default=DEFAULT_MODEL, help="bundled name, HF folder, .gguf, ...")
    par.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    par.add_argument(
        "--load-format", default="auto", choices=("auto", "hf", "gguf", "orbax", "dummy")
    )
    par.add_argument("--prompts", default=None, help="file with one prompt per line")
    par.add_argument("--max-tokens", type=int, default=16, help="greedy tokens per prompt")
    par.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    par.add_argument("--attention", default="auto", choices=("auto", "reference", "triton"))
    par.set_defaults(func=cmd_parity)
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
