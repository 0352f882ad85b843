"""Shape-bucket sweep (same as `xlaserve bench buckets`); see xlaserve/bench/buckets.py.

.venv/bin/python benchmarks/bucket_sweep.py --model smollm2-135m-instruct --profile sharegpt
.venv/bin/python benchmarks/bucket_sweep.py --model llama-3-8b --load-format dummy --dtype bfloat16
"""

import sys

from xlaserve.bench.buckets import main

if __name__ == "__main__":
    sys.exit(main())
