"""Benchmarks behind `xlaserve bench {buckets,throughput,latency,serve}` (cli.py).

Each benchmark module exposes `add_arguments(parser)`, `run(args) -> int` and `main(argv)`;
the scripts in benchmarks/ call `main`. Results (JSON + markdown, naming device and date) go to
benchmarks/results/ unless --out says otherwise.

    buckets.py     per shape bucket: compile time, step time, memory; bucket-set recommendation
    throughput.py  offline throughput vs HF transformers, % of roofline, start-up
    latency.py     TTFT and ms per output token at batch sizes 1, 4, 16, ... vs the roofline
    serve.py       online serving over gRPC / HTTP: TTFT, TPOT, ITL, E2E percentiles
    serve_report.py  its one-line summaries, markdown table and plot
    roofline.py    measured read / copy bandwidth and matmul throughput; the step roofline
    common.py      engine building, the step-recording runner, results files
"""
