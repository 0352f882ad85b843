"""`xlaserve parity`: passes on SmolLM2 in float32, fails (exit 1) when the torch model is wrong."""

import pytest
import torch

import xlaserve.kernels_cuda.model as torch_model
from tests.kernels_cuda.conftest import gpu
from tests.models.tiny_configs import save_tiny_model
from xlaserve.cli import main


def test_parity_on_smollm2_passes(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n\ndef add(a, b):\\n    return\nWater boils at\n")
    code = main(["parity", "--model", "smollm2-135m-instruct", "--prompts", str(prompts),
                 "--max-tokens", "6"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "dtype=float32 tolerance=0.001" in out and "PASS" in out
    assert out.count("6/6") == 3, out  # three prompts, every greedy token agrees


def interleaved_rope(x, cos, sin):
    """GPT-J's pairing (x0, x1), (x2, x3), ... instead of HF's halves: a classic porting bug."""
    x1, x2 = x[..., 0::2], x[..., 1::2]  # [T, heads, H/2]
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)


def test_parity_fails_on_a_wrong_torch_model(tmp_path, capsys, monkeypatch):
    save_tiny_model("llama3", tmp_path)  # no tokenizer: random token-id prompts
    assert main(["parity", "--model", str(tmp_path), "--max-tokens", "4"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(torch_model, "apply_rope", interleaved_rope)
    assert main(["parity", "--model", str(tmp_path), "--max-tokens", "4"]) == 1
    assert "FAIL: max |dlogit|" in capsys.readouterr().out


def test_parity_refuses_bad_options(capsys):
    argv = ["parity", "--model", "llama-3-8b", "--load-format", "dummy", "--max-tokens", "0"]
    assert main(argv) == 2
    assert "max_tokens must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--model", "smollm2-135m-instruct"],
        ["--model", "llama-3.2-1b", "--load-format", "dummy", "--max-tokens", "8"],
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("_", [pytest.param(None, marks=gpu)])
def test_parity_on_the_gpu(argv, dtype, _, capsys):
    # The torch side on CUDA with the compiled Triton kernels; JAX stays on the CPU here.
    code = main(["parity", *argv, "--dtype", dtype, "--device", "cuda"])
    out = capsys.readouterr().out
    print(out)  # the table for benchmarks/results/ (pytest -s)
    assert code == 0, out
    assert "attention=triton" in out
