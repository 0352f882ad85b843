"""`xlaserve bench {buckets,throughput,latency,serve}`: the subcommands and their flags, the
step recording the roofline is computed from (worked by hand), and tiny real runs of
`bench latency` and `bench throughput` whose results files are checked."""

import argparse
import dataclasses
import datetime
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from tests.models.tiny_configs import save_tiny_model
from xlaserve.bench.cli import BENCHMARKS, add_bench_parser
from xlaserve.bench.common import RecordingRunner, recording, step_shape
from xlaserve.bench.roofline import Roofline
from xlaserve.cli_args import engine_args_from, flag_name
from xlaserve.config import EngineArgs
from xlaserve.engine.runner_api import DeviceInfo, KVCacheSpec, RunnerOutput, RunnerStats
from xlaserve.engine.sampling_params import SamplingParams
from xlaserve.engine.scheduler_output import CachedSequence, NewSequence, SchedulerOutput

REPO = Path(__file__).parents[2]
NAMES = ("buckets", "throughput", "latency", "serve", "structured", "spec", "lora", "embed",
         "multimodal")  # fmt: skip


def bench_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xlaserve")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return parser


# ---- the command line ----------------------------------------------------------------------
def test_bench_help_lists_the_four(capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_parser().parse_args(["bench", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert tuple(BENCHMARKS) == NAMES and all(name in out for name in NAMES)


def test_top_level_cli_has_bench(capsys):
    from xlaserve.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(name in out for name in NAMES)


def test_bench_help_imports_no_benchmark():
    # `xlaserve bench --help` stays fast: no benchmark module (nor jax) is imported for it.
    code = (
        "import argparse, sys\n"
        "from xlaserve.bench.cli import add_bench_parser\n"
        "p = argparse.ArgumentParser(prog='xlaserve')\n"
        "add_bench_parser(p.add_subparsers(dest='command'))\n"
        "try:\n    p.parse_args(['bench', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('xlaserve.bench.') or m == 'jax'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO)  # fmt: skip
    assert out.stdout.strip().splitlines()[-1] == "['xlaserve.bench.cli']"


def flag_values() -> tuple[list[str], dict]:
    """A command line setting every EngineArgs field to a non-default value, and the values."""
    argv, expected = [], {}
    hints = typing.get_type_hints(EngineArgs)
    for f in dataclasses.fields(EngineArgs):
        hint = hints[f.name]
        base = {a for a in typing.get_args(hint) if a is not type(None)} or {hint}
        flag = flag_name(f.name)
        if f.name == "kv_cache_memory":
            argv += [flag, "0.25"]
            expected[f.name] = 0.25
        elif f.name == "quantization":  # a name from its fixed set
            argv += [flag, "int8"]
            expected[f.name] = "int8"
        elif f.name == "speculative_config":
            argv += [flag, '{"method": "ngram", "num_speculative_tokens": 2}']
            expected[f.name] = {"method": "ngram", "num_speculative_tokens": 2}
        elif hint is bool:
            argv.append(flag if not f.default else f"--no-{flag[2:]}")
            expected[f.name] = not f.default
        elif typing.get_origin(next(iter(base))) is tuple:
            argv += [flag, "16,48"]
            expected[f.name] = (16, 48)
        elif base == {int}:
            argv += [flag, "48"]
            expected[f.name] = 48
        elif base == {float}:
            argv += [flag, "0.5"]
            expected[f.name] = 0.5
        elif base == {str}:
            # A string the field accepts: its default when it has one (choices are checked
            # by EngineArgs), else a path.
            value = f.default if f.default is not None and f.name != "model" else "/tmp/x"
            argv += [flag, value]
            expected[f.name] = value
        else:
            pytest.fail(f"no test value for EngineArgs.{f.name}: {hint}")
    return argv, expected


@pytest.mark.parametrize("name", NAMES)
def test_every_engine_arg_is_a_flag(name):
    argv, expected = flag_values()
    if name == "spec":  # it sets speculative_config itself, per engine it compares
        i = argv.index("--speculative-config")
        del argv[i : i + 2], expected["speculative_config"]
    args = bench_parser().parse_args(["bench", name, *argv])
    assert args.func.__name__ == f"run_{name}"
    assert engine_args_from(args) == EngineArgs(**expected)


@pytest.mark.parametrize(
    "name, argv, message",
    [
        ("latency", ["--batch-sizes", "8", "--max-num-seqs", "4"], "--max-num-seqs 4"),
        ("latency", ["--output-len", "1"], "--output-len"),
        ("throughput", ["--hf-dtypes", "float16"], "float16"),
        ("serve", ["--protocol", "grpc", "--http-url", "http://x"], "--grpc-target"),
    ],
)
def test_bad_flags_exit_2_naming_them(name, argv, message, capsys):
    import importlib

    module = importlib.import_module(f"xlaserve.bench.{name}")
    with pytest.raises(SystemExit) as exit_:
        module.main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "script, name",
    [("throughput.py", "throughput"), ("latency.py", "latency"), ("serving.py", "serve")],
)
def test_scripts_are_the_subcommands(script, name):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--help"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.startswith(f"usage: xlaserve bench {name}")


# ---- step recording and the roofline, by hand ----------------------------------------------
class FakeRunner:
    """The runner contract with nothing behind it: returns no tokens, counts its steps."""

    kv_cache_spec = KVCacheSpec(num_layers=2, page_size=4, num_kv_heads=1, head_dim=4,
                                dtype="float32")  # fmt: skip

    def __init__(self) -> None:
        self.executed = 0

    def warmup(self) -> None:
        pass

    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        self.executed += 1
        return RunnerOutput()

    def device_info(self) -> DeviceInfo:
        return DeviceInfo("cpu", 1, parameter_count=1000, parameter_bytes=2000)

    def stats(self) -> RunnerStats:
        return RunnerStats()

    def shutdown(self) -> None:
        pass


def two_sequence_step() -> SchedulerOutput:
    # A new sequence with a 16-token prefix-cache hit feeding 8 prompt tokens, and a cached one
    # with 30 tokens in the cache decoding 1: 9 tokens fed, 24 + 31 = 55 attended afterwards.
    new = NewSequence(seq_id=1, request_id="a", sample_index=0, token_ids=tuple(range(24)),
                      num_prompt_tokens=24, params=SamplingParams(), page_ids=(0, 1, 2, 3, 4, 5),
                      num_computed_tokens=16)  # fmt: skip
    cached = CachedSequence(seq_id=2, new_token_ids=(7,), new_page_ids=(), num_computed_tokens=30)
    return SchedulerOutput(new_seqs=(new,), cached_seqs=(cached,),
                           num_scheduled_tokens={1: 8, 2: 1})  # fmt: skip


def test_step_shape_by_hand():
    assert step_shape(two_sequence_step()) == (9, 55)
    assert step_shape(SchedulerOutput()) == (0, 0)


def test_roofline_by_hand():
    runner = FakeRunner()  # 2 layers x K+V x 1 head x 4 dims x 4 bytes = 64 bytes per token
    roof = Roofline.of_runner(runner, read_bandwidth=1000.0, matmul_flops=1e4)
    assert (roof.parameter_count, roof.parameter_bytes, roof.kv_bytes_per_token) == (1000, 2000, 64)
    # memory: (2000 + 55 * 64) / 1000 = 5.52 s; compute: 2 * 1000 * 9 / 1e4 = 1.8 s
    assert roof.step_seconds(9, 55) == pytest.approx(5.52)
    # memory: 2000 / 1000 = 2 s; compute: 2 * 1000 * 20 / 1e4 = 4 s (compute bound)
    assert roof.seconds([(9, 55), (20, 0)]) == pytest.approx(5.52 + 4.0)


def test_recording_wraps_the_runner_and_puts_it_back():
    inner = FakeRunner()
    engine = type("Engine", (), {})()
    engine.runner = inner
    with recording(engine) as (recorder,):
        assert isinstance(engine.runner, RecordingRunner) and recorder.inner is inner
        engine.runner.execute(two_sequence_step())
        engine.runner.execute(SchedulerOutput())  # an empty step runs nothing: not recorded
        assert engine.runner.device_info().parameter_bytes == 2000
    assert engine.runner is inner and inner.executed == 2
    assert recorder.steps == [(9, 55)]


def test_recording_refuses_an_engine_without_a_contract_runner():
    engine = type("Engine", (), {})()
    engine.runner = object()
    with pytest.raises(TypeError, match="Runner contract"), recording(engine):
        pass


# ---- tiny real runs ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench") / "m"
    save_tiny_model("llama3", folder)  # vocab 160, no tokenizer: token-id prompts
    return str(folder)


def check_file_names(out: Path, prefix: str) -> dict:
    (path,) = out.glob(f"{prefix}-*.json")
    result = json.loads(path.read_text())
    assert result["date"] == datetime.date.today().isoformat() and result["device"]
    assert path.name.endswith(f"-{result['date']}.json")
    md = path.with_suffix(".md").read_text()
    assert result["device"] in md and result["date"] in md
    return result


def positive_dist(d: dict) -> bool:
    return 0 < d["p50"] <= d["p90"] <= d["p99"] and d["mean"] > 0


def test_bench_latency_names_its_file_after_the_storage_options(tiny_model, tmp_path):
    # Runs of one model with another KV cache (or quantization) keep their own files.
    args = bench_parser().parse_args(
        ["bench", "latency", "--model", tiny_model, "--dtype", "float32", "--max-model-len", "64",
         "--max-num-seqs", "1", "--input-len", "8", "--output-len", "3", "--batch-sizes", "1",
         "--num-iters", "1", "--num-iters-warmup", "0", "--ttft-input-lens", "8",
         "--llama-cpp", "off", "--kv-cache-dtype", "int8", "--out", str(tmp_path)])  # fmt: skip
    assert args.func(args) == 0
    (path,) = tmp_path.glob("latency-*.json")
    assert path.name.startswith(f"latency-{Path(tiny_model).name}-kv-int8-in8out3-bs1-")


def test_bench_latency_tiny_model(tiny_model, tmp_path):
    args = bench_parser().parse_args(
        ["bench", "latency", "--model", tiny_model, "--dtype", "float32", "--max-model-len", "64",
         "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--input-len", "8",
         "--output-len", "6", "--batch-sizes", "1,4", "--num-iters", "2",
         "--ttft-input-lens", "16,40", "--llama-cpp", "off", "--out", str(tmp_path)])  # fmt: skip
    assert args.func(args) == 0
    r = check_file_names(tmp_path, "latency")
    assert [t["input_len"] for t in r["ttft_by_input_len"]] == [16, 40]
    assert all(t["ttft_ms"] > 0 for t in r["ttft_by_input_len"])
    assert r["llama_cpp"] == {"ran": False, "reason": "off (--llama-cpp off)"}
    assert r["compiles_after_warmup"] == 0 and r["compiles"] > 0
    m = r["measured"]
    assert m["read_bandwidth_GBps"] > 0 and m["matmul_TFLOPs"] > 0
    # The tiny llama3 in float32: 3 layers x K+V x 2 KV heads x head dim 16 x 4 bytes.
    assert m["kv_bytes_per_token_per_device"] == 3 * 2 * 2 * 16 * 4
    # Every weight of the HF model (sum of numel in torch: 122304), 4 bytes each.
    assert m["parameter_count_per_device"] == 122304
    assert m["parameter_bytes_per_device"] == 4 * 122304
    assert [b["batch_size"] for b in r["batches"]] == [1, 4]
    for b in r["batches"]:
        assert b["iterations"] == 2
        assert all(positive_dist(b[k]) for k in ("ttft_ms", "tpot_ms", "latency_ms"))
        assert b["ttft_ms"]["p99"] <= b["latency_ms"]["p99"]
        # The 4 prompts of 8 tokens prefill in one step (budget 32) with the first tokens; each
        # of the 5 decode steps then feeds one token per sequence, attending to 9..13 tokens.
        assert b["decode_steps"] == 5
        assert b["context"] == pytest.approx(11.0)
        assert b["ms_per_output_token"] > 0 and b["output_tokens_per_s"] > 0
        assert b["roofline_ms_per_token"] > 0 and b["percent_of_roofline"] > 0
        # Host work per step (scheduling, packing, outputs) is part of the step's wall time.
        assert 0 < b["host_ms_per_step"] <= b["ms_per_output_token"]


def test_bench_throughput_tiny_model(tiny_model, tmp_path):
    args = bench_parser().parse_args(
        ["bench", "throughput", "--model", tiny_model, "--dtype", "float32",
         "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--workload", "fixed:12/6",
         "--num-prompts", "6", "--repeats", "2", "--hf-dtypes", "float32", "--hf-batch", "6",
         "--out", str(tmp_path)])  # fmt: skip
    assert args.func(args) == 0
    r = check_file_names(tmp_path, "throughput")
    assert r["engine"]["max_model_len"] == 512  # the subcommand's default
    assert r["dtype"] == "float32" and r["workload"] == "fixed:12/6"
    x = r["xlaserve"]
    assert x["compiles_after_warmup"] == 0 and x["compiles"] > 0
    assert x["output_tokens"] == 6 * 6 and len(x["all_seconds"]) == 2
    assert x["output_tokens_per_s"] > 0 and x["requests_per_s"] > 0
    assert 0 < x["roofline_seconds"] and x["percent_of_roofline"] > 0
    b1 = r["batch1_decode"]
    assert b1["ms_per_token"] > 0 and b1["percent_of_roofline"] > 0
    assert b1["context"] == pytest.approx(128 + 128 / 2)  # 129..255 over 127 decode steps
    (hf,) = r["transformers"]
    assert hf["dtype"] == "float32" and hf["output_tokens"] == 36
    assert hf["ratio"] == pytest.approx(x["output_tokens_per_s"] / hf["output_tokens_per_s"])
    md = (tmp_path / next(tmp_path.glob("*.md")).name).read_text()
    assert "| transformers generate (dynamic cache) | float32 |" in md
