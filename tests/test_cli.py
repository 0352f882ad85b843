"""The command line: convert stores a loadable model; bad input exits 2 with a named error."""

import numpy as np

from tests.conftest import ENGINE_KWARGS, TEST_TOKEN_BUCKETS
from tests.models.tiny_configs import save_tiny_model
from xlaserve.checkpoints.loader import load_model
from xlaserve.cli import main
from xlaserve.models.generate import greedy_generate


def test_convert_then_load_gives_same_tokens(tmp_path, capsys):
    save_tiny_model("qwen2", tmp_path / "hf")
    assert main(["convert", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "ox"),
                 "--dtype", "float32"]) == 0  # fmt: skip
    assert "stored float32 (source float32)" in capsys.readouterr().out
    prompt = np.arange(3, 20).tolist()
    a = greedy_generate(load_model(str(tmp_path / "hf"), dtype="float32").model, [prompt], 8)
    b = greedy_generate(load_model(str(tmp_path / "ox"), dtype="float32").model, [prompt], 8)
    assert a == b


def test_bad_model_path_exits_2_naming_it(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "missing" in capsys.readouterr().err


def test_bad_dtype_exits_2_naming_it(capsys):
    code = main(["generate", "--model", "x", "--load-format", "dummy", "--dtype", "int3",
                 "--prompt", "x"])  # fmt: skip
    assert code == 2 and "int3" in capsys.readouterr().err


def test_generate_on_the_bundled_model(capsys):
    # The shared test engine's shapes: its compiled graphs come from the persistent cache.
    shapes = {"--max-model-len": ENGINE_KWARGS["max_model_len"],
              "--max-num-seqs": ENGINE_KWARGS["max_num_seqs"],
              "--max-num-batched-tokens": ENGINE_KWARGS["max_num_batched_tokens"],
              "--token-buckets": ",".join(map(str, TEST_TOKEN_BUCKETS))}  # fmt: skip
    argv = ["generate", "--prompt", "The capital of France is", "--max-tokens", "3",
            "--dtype", "float32", *(str(x) for kv in shapes.items() for x in kv)]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("The capital of France is Paris")
