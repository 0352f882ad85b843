"""CLI/EngineArgs parity: every `EngineArgs` field is a flag of `generate`, `chat` and `serve`
(and of the bench subcommands, whose all-flags line tests/bench/test_bench_cli.py checks), each
flag's value reaches the EngineArgs, and a flag not given keeps the subcommand's default."""

import argparse
import dataclasses

import pytest

from xlaserve.cli import build_parser
from xlaserve.cli_args import engine_args_from, flag_name
from xlaserve.config import DEFAULT_COMPILATION_CACHE, EngineArgs
from xlaserve.spec_decode.config import SpeculativeConfig

FIELDS = [f.name for f in dataclasses.fields(EngineArgs)]

# Subcommand -> (argv that selects it, the engine defaults it documents).
COMMANDS = {
    "generate": (["generate", "--prompt", "x"], {"max_model_len": 2048, "max_num_seqs": 8}),
    "chat": (["chat"], {"max_model_len": 2048, "max_num_seqs": 8}),
    "serve": (["serve"], {}),
    "bench buckets": (["bench", "buckets"], {"max_model_len": 1024, "max_num_seqs": 32,
                                             "max_num_batched_tokens": 512,
                                             "min_token_bucket": 8}),
    "bench throughput": (["bench", "throughput"], {"max_model_len": 512, "max_num_seqs": 32,
                                                   "max_num_batched_tokens": 256}),
    "bench latency": (["bench", "latency"], {"max_model_len": 512, "max_num_seqs": 16}),
    "bench serve": (["bench", "serve"], {}),
}  # fmt: skip
MAIN = ("generate", "chat", "serve")

# (field, flag arguments, the value EngineArgs gets): every form a user types.
CASES = [
    ("model", ["/models/llama"], "/models/llama"),
    ("dtype", ["bfloat16"], "bfloat16"),
    ("load_format", ["dummy"], "dummy"),
    ("max_model_len", ["96"], 96),
    ("max_model_len", ["none"], None),
    ("max_num_seqs", ["12"], 12),
    ("max_num_batched_tokens", ["96"], 96),
    ("max_num_batched_tokens", ["none"], None),
    ("page_size", ["8"], 8),
    ("kv_cache_memory", ["1048576"], 1048576),  # bytes
    ("kv_cache_memory", ["0.25"], 0.25),  # a fraction of free memory
    ("kv_cache_memory", ["1e9"], 1_000_000_000),  # bytes in exponent notation
    ("kv_cache_memory", ["1.0"], 1.0),  # all of free memory
    ("kv_cache_memory", ["none"], None),
    ("enable_prefix_caching", None, True),
    ("enable_prefix_caching", "no", False),
    ("enable_chunked_prefill", None, True),
    ("enable_chunked_prefill", "no", False),
    ("async_scheduling", None, True),
    ("async_scheduling", "no", False),
    ("scheduling_policy", ["priority"], "priority"),
    ("max_waiting_requests", ["7"], 7),
    ("max_waiting_requests", ["none"], None),
    ("seed", ["1234"], 1234),
    ("attention_backend", ["reference"], "reference"),
    ("tensor_parallel_size", ["2"], 2),
    ("data_parallel_size", ["3"], 3),
    ("expert_parallel_size", ["4"], 4),
    ("compilation_cache_dir", ["/tmp/xla-cache"], "/tmp/xla-cache"),
    ("compilation_cache_dir", ["none"], None),  # the cache off
    ("min_token_bucket", ["8"], 8),
    ("min_token_bucket", ["none"], None),  # 1 for generation, 16 for encoders
    (
        "speculative_config",
        ['{"method": "ngram", "num_speculative_tokens": 3}'],
        SpeculativeConfig("ngram", 3),
    ),
    ("speculative_config", ["none"], None),
    ("token_buckets", ["8,16,64"], (8, 16, 64)),
    ("token_buckets", ["none"], None),
    ("backend", ["torch"], "torch"),
    ("runner", ["pooling"], "pooling"),
    ("structured_outputs_backend", ["xgrammar"], "xgrammar"),
    ("structured_outputs_timeout", ["2.5"], 2.5),
    ("enable_lora", None, True),
    ("enable_lora", "no", False),
    ("max_loras", ["8"], 8),
    ("max_lora_rank", ["64"], 64),
    ("max_cpu_loras", ["16"], 16),
    ("max_cpu_loras", ["none"], None),  # default: max_loras
    ("limit_mm_per_prompt", ["2"], 2),
    ("max_image_pixels", ["1000000"], 1000000),
    ("max_encoder_features_per_step", ["256"], 256),
    ("max_encoder_features_per_step", ["none"], None),
    ("allowed_local_media_path", ["/srv/images"], "/srv/images"),
    ("allow_remote_media", None, True),
    ("allow_remote_media", "no", False),
    ("quantization", ["w8a8"], "w8a8"),
    ("quantization", ["none"], None),
    ("kv_cache_dtype", ["int8"], "int8"),
]


def flag_argv(field: str, args) -> list[str]:
    if args is None:
        return [flag_name(field)]
    if args == "no":
        return ["--no-" + flag_name(field)[2:]]
    return [flag_name(field), *args]


def parse(command: str, extra: list[str]) -> argparse.Namespace:
    return build_parser().parse_args([*COMMANDS[command][0], *extra])


def expected(command: str, **values) -> EngineArgs:
    return EngineArgs(**{**COMMANDS[command][1], **values})


def case_id(case) -> str:
    field, args, _ = case
    return f"{field}={args if args in (None, 'no') else args[0]}"


def test_every_field_has_cases_and_help():
    assert {c[0] for c in CASES} == set(FIELDS)
    for f in dataclasses.fields(EngineArgs):
        assert f.metadata.get("help", "").strip(), f"EngineArgs.{f.name} has no help text"
    bools = [f.name for f in dataclasses.fields(EngineArgs) if isinstance(f.default, bool)]
    for name in bools:  # both directions of every bool
        assert {c[1] for c in CASES if c[0] == name} == {None, "no"}, name


@pytest.mark.parametrize("command", MAIN)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_each_flag_reaches_engine_args(command, case):
    field, args, value = case
    engine_args = engine_args_from(parse(command, flag_argv(field, args)))
    assert engine_args == expected(command, **{field: value})
    assert type(getattr(engine_args, field)) is type(value)  # 1048576 bytes stay an int


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_not_given_keep_the_documented_defaults(command):
    engine_args = engine_args_from(parse(command, []))
    assert engine_args == expected(command)
    if command in ("generate", "chat"):
        assert (engine_args.max_model_len, engine_args.max_num_seqs) == (2048, 8)
    if command == "serve":  # the server takes the model's full context and 32 slots
        assert engine_args == EngineArgs()
        assert (engine_args.max_model_len, engine_args.max_num_seqs) == (None, 32)
        assert engine_args.compilation_cache_dir == DEFAULT_COMPILATION_CACHE


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("bench ")])
def test_bench_flags_also_take_none_and_the_default_direction(command):
    # tests/bench/test_bench_cli.py sets every flag to a non-default value; here the forms it
    # does not: "none" over a subcommand default, bytes as an int, bools set to their default.
    argv = ["--max-model-len", "none", "--max-num-batched-tokens", "none",
            "--kv-cache-memory", "1048576", "--compilation-cache-dir", "none",
            "--token-buckets", "8,16,64", "--enable-prefix-caching",
            "--enable-chunked-prefill"]  # fmt: skip
    assert engine_args_from(parse(command, argv)) == expected(
        command, max_model_len=None, max_num_batched_tokens=None, kv_cache_memory=1048576,
        compilation_cache_dir=None, token_buckets=(8, 16, 64),
    )  # fmt: skip


def test_last_flag_wins_and_overrides_win_over_flags():
    args = parse("serve", ["--no-enable-prefix-caching", "--enable-prefix-caching",
                           "--max-num-seqs", "4", "--max-num-seqs", "6"])  # fmt: skip
    assert engine_args_from(args) == EngineArgs(max_num_seqs=6)
    assert engine_args_from(args, max_num_seqs=2).max_num_seqs == 2


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--token-buckets", "8,x"], "expected comma-separated ints, got '8,x'"),
        (["--max-num-seqs", "many"], "--max-num-seqs: invalid int value: 'many'"),
        (["--kv-cache-memory", "lots"], "expected bytes or a fraction in (0, 1], got 'lots'"),
    ],
)
def test_bad_values_exit_2_naming_the_flag(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse("serve", argv)
    assert exit_.value.code == 2
    assert words in capsys.readouterr().err


def squash(text: str) -> str:
    """Help text with all whitespace removed (argparse wraps lines, also at hyphens)."""
    return "".join(text.split())


@pytest.mark.parametrize("command", MAIN)
def test_help_lists_every_flag_with_its_help_and_default(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(command, ["--help"])
    assert exit_.value.code == 0
    out = squash(capsys.readouterr().out)
    defaults = COMMANDS[command][1]
    for f in dataclasses.fields(EngineArgs):
        flag = flag_name(f.name)
        if isinstance(f.default, bool):
            assert squash(f"{flag}, --no-{flag[2:]}") in out, flag
        else:
            assert flag in out, flag
        default = defaults.get(f.name, f.default)
        help_text = f.metadata["help"]
        if "default" in help_text and f.name not in defaults:  # it says its default itself
            assert squash(help_text) in out and squash(f"{help_text} (default:") not in out
        else:
            assert squash(f"{help_text} (default: {default})") in out, f.name
