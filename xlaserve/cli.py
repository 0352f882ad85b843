"""Command line: `xlaserve generate | chat | convert | serve | bench | parity`.

Engine options are flags generated from `EngineArgs` (see `xlaserve.cli_args`), so every
subcommand that runs an engine accepts every engine option.
"""

import argparse
import logging
import sys
import time

from xlaserve.checkpoints.presets import DEFAULT_MODEL
from xlaserve.cli_args import add_engine_args, engine_args_from

# A short interactive or one-shot run needs neither the model's whole context nor 32 slots.
INTERACTIVE_DEFAULTS = {"max_model_len": 2048, "max_num_seqs": 8}


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")


def cmd_generate(args: argparse.Namespace) -> int:
    from xlaserve import LLM, SamplingParams

    t0 = time.perf_counter()
    engine_args = engine_args_from(args)
    llm = LLM(**vars_of(engine_args))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
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
        f"[{engine_args.model}: {len(out.prompt_token_ids)} prompt + "
        f"{len(out.outputs[0].token_ids)} generated tokens ({out.outputs[0].finish_reason}); "
        f"start-up {t1 - t0:.1f}s (warm-up {m['warmup_seconds']:.1f}s, {m['compiles']} "
        f"compiles), generate {t2 - t1:.2f}s]",
        file=sys.stderr,
    )
    return 0


def vars_of(engine_args) -> dict:
    import dataclasses

    return {f.name: getattr(engine_args, f.name) for f in dataclasses.fields(engine_args)}


def cmd_chat(args: argparse.Namespace) -> int:
    """An interactive REPL that streams the assistant's tokens as they are generated."""
    from xlaserve import SamplingParams
    from xlaserve.engine.builder import build_engine

    engine = build_engine(engine_args_from(args))
    history: list[dict] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print(
        "xlaserve chat: empty line or Ctrl-D to quit, /reset to clear the history", file=sys.stderr
    )
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
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
        rid = engine.add_request(None, {"messages": list(history)}, params)
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
    from xlaserve.checkpoints.convert import convert

    report = convert(
        args.model,
        args.out,
        dtype=args.dtype,
        load_format=args.load_format,
        overwrite=args.overwrite,
    )
    print(report.describe())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """gRPC + OpenAI HTTP servers until SIGTERM/SIGINT (exit 0) or an engine failure (exit 1)."""
    from xlaserve.serving.server import ServerConfig, run_server

    engine_args = engine_args_from(args)
    if args.coordinator_address:
        from xlaserve.sharding import distributed

        distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
        if args.process_id != 0:  # followers run the leader's steps; only process 0 serves
            from xlaserve.engine.builder import run_follower

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
        tool_call_parser=args.tool_call_parser,
        jetstream_port=args.jetstream_port,
        jetstream_api_key=args.jetstream_api_key,
        jetstream_no_auth=args.jetstream_no_auth,
        max_n=args.max_n,
        max_tokens_default=args.max_tokens_default,
        max_tokens_cap=args.max_tokens_cap,
        lora_modules=tuple(args.lora_modules or ()),
        allow_runtime_lora_loading=args.allow_runtime_lora_loading,
    )
    try:
        return run_server(engine_args, config)
    except OSError as e:  # e.g. a port in use
        print(f"error: {e}", file=sys.stderr)
        return 2


def _lora_module(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, path


def add_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server options")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    g.add_argument("--grpc-port", type=int, default=50051,
                   help="0: any free port; -1: off (default: %(default)s)")  # fmt: skip
    g.add_argument("--http-port", type=int, default=8000,
                   help="0: any free port; -1: off (default: %(default)s)")  # fmt: skip
    g.add_argument("--api-key", default=None,
                   help="required as 'Bearer <key>' except on health (default: none)")  # fmt: skip
    g.add_argument("--jetstream-port", type=int, default=None,
                   help="also serve JetStream's Orchestrator (and health) alone on this port, "
                   "for JetStream clients, which send no API key (default: off)")  # fmt: skip
    g.add_argument("--jetstream-api-key", default=None,
                   help="the key the --jetstream-port listener requires "
                   "(default: --api-key)")  # fmt: skip
    g.add_argument("--jetstream-no-auth", action="store_true",
                   help="no key on the --jetstream-port listener (a warning is logged; "
                   "firewall that port)")  # fmt: skip
    g.add_argument("--served-model-name", default=None,
                   help="model name clients send (default: the --model value)")  # fmt: skip
    g.add_argument(
        "--coordinator-address",
        default=None,
        help="multi-host: HOST:PORT of process 0 (every process passes the same)",
    )
    g.add_argument("--num-processes", type=int, default=1,
                   help="multi-host: processes in all (default: %(default)s)")  # fmt: skip
    g.add_argument("--process-id", type=int, default=0,
                   help="multi-host: this process, 0..N-1 (default: %(default)s)")  # fmt: skip
    g.add_argument("--max-body-bytes", type=int, default=4 << 20,
                   help="largest HTTP body / gRPC message (default: %(default)s)")  # fmt: skip
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on shutdown "
                   "(default: %(default)s)")  # fmt: skip
    g.add_argument("--max-n", type=int, default=16,
                   help="most samples one request may ask (HTTP/gRPC n, JetStream num_samples; "
                   "default: %(default)s)")  # fmt: skip
    g.add_argument("--max-tokens-default", type=int, default=256,
                   help="max_tokens for gRPC Generate / JetStream Decode requests that set none "
                   "(HTTP keeps vLLM's: completions 16, chat as much as fits; "
                   "default: %(default)s)")  # fmt: skip
    g.add_argument("--max-tokens-cap", type=int, default=None,
                   help="refuse requests asking more max_tokens, and cap the defaults "
                   "(default: none, max_model_len bounds them)")  # fmt: skip
    g.add_argument("--lora-modules", nargs="+", type=_lora_module, default=None,
                   metavar="NAME=PATH",
                   help="LoRA adapters (PEFT folders) served under these model names from "
                   "start-up (needs --enable-lora)")  # fmt: skip
    g.add_argument("--allow-runtime-lora-loading", action="store_true",
                   help="offer POST /v1/load_lora_adapter and /v1/unload_lora_adapter (and the "
                   "gRPC Load/Unload RPCs), behind --api-key like every route")  # fmt: skip
    from xlaserve.tools.parsers import PARSERS

    g.add_argument(
        "--tool-call-parser",
        default=None,
        choices=sorted(PARSERS),
        help='reads tool calls from free output for tool_choice "auto" (off: "auto" is refused)',
    )


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
    from xlaserve.bench.cli import add_bench_parser

    parser = argparse.ArgumentParser(prog="xlaserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a continuation of one prompt")
    add_engine_args(gen, defaults=INTERACTIVE_DEFAULTS)
    add_sampling_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat REPL with streamed replies")
    add_engine_args(chat, defaults=INTERACTIVE_DEFAULTS)
    add_sampling_args(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    chat.set_defaults(func=cmd_chat)

    conv = sub.add_parser("convert", help="store converted parameters with orbax")
    conv.add_argument("--model", default=DEFAULT_MODEL, help="bundled name, HF folder, .gguf")
    conv.add_argument("--dtype", default=None,
                      help="stored dtype (default: keep the source precision)")  # fmt: skip
    conv.add_argument(
        "--load-format", default="auto", choices=("auto", "hf", "gguf", "orbax", "dummy")
    )
    conv.add_argument("--out", required=True, help="new (or empty) output folder")
    conv.add_argument("--overwrite", action="store_true",
                      help="replace the contents of a non-empty --out folder (written beside "
                      "it, then swapped in)")  # fmt: skip
    conv.set_defaults(func=cmd_convert)

    serve = sub.add_parser("serve", help="gRPC (+ JetStream) and OpenAI HTTP servers")
    add_engine_args(serve)
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)

    add_bench_parser(sub)

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


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of each record."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def log_progress_to_stderr() -> None:
    """xlaserve's INFO lines (what is loading, warm-up graph i of n, seconds) on stderr. The
    root logger gets the handler (unless something configured it already), so that a library's
    later `basicConfig` adds no second copy of each line; other loggers stay at WARNING."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        handlers=[_StderrHandler()])  # fmt: skip
    log = logging.getLogger("xlaserve")
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("generate", "chat", "serve"):
        log_progress_to_stderr()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
