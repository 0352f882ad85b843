"""`xlaserve bench {buckets,throughput,latency,serve,structured,spec,lora,embed,multimodal}`.

Each benchmark module offers `add_arguments(parser)` and `run(args) -> int`. A subcommand's
module is imported only when that subcommand is parsed (its flags are added then), so
`xlaserve --help` and `xlaserve bench --help` import none of them.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

BENCHMARKS = {
    "buckets": "compile time, step time and memory per shape bucket; a bucket-set "
    "recommendation for a traffic profile",
    "throughput": "offline throughput vs HF transformers side by side, against the roofline",
    "latency": "TTFT and ms per output token at small batch sizes, against the roofline",
    "serve": "online serving over gRPC/HTTP: TTFT, TPOT, ITL, E2E percentiles at request "
    "rates or concurrencies",
    "structured": "structured outputs: constrained vs unconstrained decode steps, grammar "
    "compile cold vs cached, TTFT of a constrained request joining a busy batch",
    "spec": "speculative decoding: output tokens/s with n-gram and draft-model drafts vs none, "
    "on repetitive and chat prompts, with acceptance rates",
    "lora": "multi-LoRA: decode steps with many adapters vs the base model, adapter load time",
    "embed": "embeddings per second vs sentence-transformers' encode, short and long inputs",
    "multimodal": "vision-language: TTFT with one image (encoder cache miss vs hit), "
    "requests/s for a mixed image/text load",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Docstrings as written; every flag with help text shows its default."""


class _LazyParser(argparse.ArgumentParser):
    """A parser whose arguments are added by `populate` the first time it parses or prints its
    help, i.e. only when its subcommand is the one chosen."""

    def __init__(self, *args, populate: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self._populate = populate

    def populate(self) -> None:
        if self._populate is not None:
            populate, self._populate = self._populate, None
            populate(self)

    def parse_known_args(self, args=None, namespace=None):
        self.populate()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self.populate()
        return super().format_help()

    def format_usage(self) -> str:
        self.populate()
        return super().format_usage()


def _module(name: str):
    return importlib.import_module(f"xlaserve.bench.{name}")


def _populate(name: str) -> Callable[[argparse.ArgumentParser], None]:
    def populate(parser: argparse.ArgumentParser) -> None:
        module = _module(name)
        parser.description = module.__doc__
        module.add_arguments(parser)

    return populate


def _runner(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return _module(name).run(args)

    run.__name__ = f"run_{name}"
    return run


def add_bench_parser(subparsers) -> None:
    """Adds `bench` with one sub-subcommand per benchmark to a top-level `add_subparsers()`;
    each sets `func` to its run(args) -> exit status."""
    bench = subparsers.add_parser(
        "bench",
        help="benchmarks: buckets, throughput, latency, serve, structured, spec, lora, embed",
        description="Benchmarks; results go to benchmarks/results/ unless --out says otherwise.",
    )
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True,
                               parser_class=_LazyParser)  # fmt: skip
    for name, summary in BENCHMARKS.items():
        parser = sub.add_parser(name, help=summary, populate=_populate(name),
                                formatter_class=HelpFormatter)  # fmt: skip
        parser.set_defaults(func=_runner(name))
