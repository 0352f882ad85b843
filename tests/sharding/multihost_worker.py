"""One process of a two-process CPU "multi-host" run (4 fake devices each, gloo collectives).

usage: multihost_worker.py MODEL_DIR COORDINATOR PROCESS_ID
Process 0 generates with tensor parallel 8 across both processes and prints the tokens as JSON;
process 1 follows the leader's steps until it is released.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

from xlaserve.sharding import distributed  # noqa: E402

PROMPTS = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (5, 17, 33, 2)]


def main() -> None:
    model_dir, coordinator, process_id = sys.argv[1], sys.argv[2], int(sys.argv[3])
    distributed.initialize(coordinator, num_processes=2, process_id=process_id)
    from xlaserve.config import EngineArgs

    args = EngineArgs(model=model_dir, dtype="float32", max_model_len=128, max_num_seqs=4,
                      max_num_batched_tokens=64, tensor_parallel_size=8,
                      compilation_cache_dir=None, min_token_bucket=16)  # fmt: skip
    if process_id != 0:
        from xlaserve.engine.builder import run_follower

        run_follower(args)
        return
    from xlaserve import LLM, SamplingParams

    llm = LLM(**args.__dict__)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    m = llm.get_metrics()
    llm.engine.shutdown()
    print(json.dumps({"tokens": [o.outputs[0].token_ids for o in outs],
                      "compiles_after_warmup": m["compiles_after_warmup"]}))  # fmt: skip


if __name__ == "__main__":
    main()
