"""Online serving benchmark over gRPC and HTTP: TTFT, TPOT, ITL, E2E percentiles per request
rate or concurrency (= `xlaserve bench serve`; the code is xlaserve/bench/serve.py). Results go
to benchmarks/results/ unless --out says otherwise.

    .venv/bin/python benchmarks/serving.py --model smollm2-135m-instruct --dtype float32 \\
        --max-model-len 512 --num-prompts 32 --input-len 64 --output-len 32 \\
        --request-rate 2,8,inf --concurrency 8 --protocol grpc,http
    .venv/bin/python benchmarks/serving.py --grpc-target 127.0.0.1:50051 \\
        --http-url http://127.0.0.1:8000 --api-key secret --request-rate 1,2,4,inf
"""

import sys
from pathlib import Path

from xlaserve.bench.serve import main

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    sys.exit(main(["--out", str(RESULTS), *sys.argv[1:]]))  # a later --out wins
