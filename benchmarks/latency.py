"""TTFT and ms per output token at small batch sizes against the roofline
(= `xlaserve bench latency`; the code is xlaserve/bench/latency.py). Results go to
benchmarks/results/ unless --out says otherwise.

    .venv/bin/python benchmarks/latency.py --input-len 128 --output-len 128 --batch-sizes 1,4,16
    .venv/bin/python benchmarks/latency.py --model llama-3-8b --load-format dummy \\
        --dtype bfloat16 --max-model-len 4096 --input-len 1024 --output-len 128 \\
        --batch-sizes 1,8,32 --max-num-seqs 32                          # one GPU
"""

import sys
from pathlib import Path

from xlaserve.bench.latency import main

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    sys.exit(main(["--out", str(RESULTS), *sys.argv[1:]]))  # a later --out wins
