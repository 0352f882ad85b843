"""Run as a script with 8 fake CPU devices (XLA_FLAGS set before jax loads); prints JSON.

Serves a tiny random Llama (4 query heads, 4 KV heads: they split over 4 devices) over gRPC
under tensor parallel 4 and data parallel 2 x tensor parallel 2, and prints what GetModelInfo
answers for each, plus the greedy tokens of one request (the served engine works).
"""

import json
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from tests.models.tiny_configs import save_tiny_model  # noqa: E402
from xlaserve.config import EngineArgs  # noqa: E402
from xlaserve.engine.async_engine import AsyncEngine  # noqa: E402
from xlaserve.engine.builder import build_engine  # noqa: E402
from xlaserve.serving.client import XlaServeClient  # noqa: E402
from xlaserve.serving.server import ServerConfig, ServerThread  # noqa: E402

LAYOUTS = {"tp4": (4, 1), "dp2xtp2": (2, 2)}  # name -> (tensor, data)


def serve_and_ask(folder: str, tp: int, dp: int) -> dict:
    args = EngineArgs(model=folder, dtype="float32", max_model_len=128, max_num_seqs=4,
                      max_num_batched_tokens=64, tensor_parallel_size=tp,
                      data_parallel_size=dp, compilation_cache_dir=None,
                      min_token_bucket=16)  # fmt: skip
    server = ServerThread(
        AsyncEngine(build_engine(args)), ServerConfig(grpc_port=0, http_port=None)
    )
    endpoints = server.start()
    try:
        with XlaServeClient(endpoints.grpc_target, timeout=60) as client:
            info = client.model_info()
            tokens = client.generate([3, 4, 5, 6, 7], max_tokens=6, temperature=0.0).token_ids
    finally:
        exit_code = server.stop()
    fields = {f.name: getattr(info, f.name) for f in info.DESCRIPTOR.fields}
    fields["mesh_shape"] = dict(info.mesh_shape)
    fields["eos_token_ids"] = list(info.eos_token_ids)
    return {"info": fields, "tokens": tokens, "exit_code": exit_code}


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        save_tiny_model("llama2", folder)
        results = {name: serve_and_ask(folder, tp, dp) for name, (tp, dp) in LAYOUTS.items()}
    results["folder"] = folder
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
