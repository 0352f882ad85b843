"""Offline throughput vs HF transformers, roofline, batch-1 decode, start-up
(= `xlaserve bench throughput`; the code is xlaserve/bench/throughput.py). Results go to
benchmarks/results/ unless --out says otherwise.

    .venv/bin/python benchmarks/throughput.py --startup                 # issue 3, CPU
    .venv/bin/python benchmarks/throughput.py --model llama-3-8b --load-format dummy \\
        --dtype bfloat16 --workload sharegpt --num-prompts 1000 --max-num-seqs 256 \\
        --max-num-batched-tokens 2048 --max-model-len 4096             # issue 8, one GPU
"""

import sys
from pathlib import Path

from xlaserve.bench.throughput import main

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    sys.exit(main(["--out", str(RESULTS), *sys.argv[1:]]))  # a later --out wins
