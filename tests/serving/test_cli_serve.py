"""`xlaserve serve` as a real process on a tiny model: it announces its ports, answers with the
offline engine's tokens, requires its API key, and exits 0 on SIGTERM after draining."""

import os
import queue
import re
import signal
import subprocess
import sys
import threading

import grpc
import httpx
import pytest

from tests.conftest import TEST_TOKEN_BUCKETS
from tests.models.tiny_configs import save_tiny_model
from xlaserve import LLM, SamplingParams
from xlaserve.serving.client import XlaServeClient

ENGINE = dict(dtype="float32", max_model_len=64, max_num_seqs=4,
              token_buckets=TEST_TOKEN_BUCKETS)  # fmt: skip


@pytest.mark.slow
def test_serve_subprocess_answers_and_exits_zero_on_sigterm(tmp_path):
    save_tiny_model("qwen2", tmp_path / "hf")
    model = str(tmp_path / "hf")
    argv = [sys.executable, "-m", "xlaserve.cli", "serve", "--model", model,
            "--dtype", "float32", "--max-model-len", "64", "--max-num-seqs", "4",
            "--token-buckets", ",".join(map(str, TEST_TOKEN_BUCKETS)),
            "--grpc-port", "0", "--http-port", "0", "--api-key", "sesame"]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    try:
        try:
            banner = lines.get(timeout=240)
        except queue.Empty:
            pytest.fail("no banner; stderr:\n" + (tmp_path / "stderr.txt").read_text()[-3000:])
        ports = re.search(r"gRPC on [\d.]+:(\d+), HTTP on http://[\d.]+:(\d+)", banner)
        grpc_port, http_port = map(int, ports.groups())
        prompt = [5, 17, 42, 7, 99]
        params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
        offline = LLM(model, **ENGINE).generate({"prompt_token_ids": prompt}, params,
                                                use_tqdm=False)[0].outputs[0]  # fmt: skip
        with XlaServeClient(f"127.0.0.1:{grpc_port}", api_key="sesame", timeout=60) as client:
            result = client.generate(prompt, temperature=0.0, max_tokens=10, ignore_eos=True)
            assert result.token_ids == offline.token_ids
            assert client.health() == "SERVING"
        with XlaServeClient(f"127.0.0.1:{grpc_port}", timeout=60) as no_key:
            with pytest.raises(grpc.RpcError) as info:
                no_key.generate(prompt, max_tokens=2)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        response = httpx.post(
            f"http://127.0.0.1:{http_port}/v1/completions",
            json={"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True,
                  "logprobs": 0, "return_tokens_as_token_ids": True},
            headers={"Authorization": "Bearer sesame"},
            timeout=60,
        )  # fmt: skip
        tokens = response.json()["choices"][0]["logprobs"]["tokens"]
        assert [int(t.split(":")[1]) for t in tokens] == offline.token_ids
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
