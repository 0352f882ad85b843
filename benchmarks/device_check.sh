#!/usr/bin/env bash
# `make gpu-check` / `make tpu-check`: everything that only a real accelerator can check, in one
# command that finishes within 10 minutes and leaves its figures in benchmarks/results/:
#   1. every device-only test (pytest -m gpu|tpu: Pallas kernels compiled for the device, the
#      Triton kernels compiled on CUDA, parity of the torch backend on the GPU);
#   2. the kernel benchmarks (ragged paged attention: ours vs JAX's stock kernel vs reference;
#      on GPU the GGUF packed-block matmul kernel vs XLA's dequantize-then-dot and bfloat16);
#   3. a short Llama-3-8B (random weights, bfloat16) latency and throughput run of the engine.
# Each stage has its own time limit; a stage that fails or times out is reported and the others
# still run. Exit status: 0 when every stage passed.
#
# usage: benchmarks/device_check.sh gpu|tpu   (run from the repository root, in the venv)
set -uo pipefail
PLATFORM="${1:?usage: device_check.sh gpu|tpu}"
PY="${PYTHON:-.venv/bin/python}"
XLASERVE="$PY -m xlaserve.cli"
RESULTS="benchmarks/results"
STAMP="$(date +%F)"
LOG="$RESULTS/${PLATFORM}-check-$STAMP.log"
mkdir -p "$RESULTS"

case "$PLATFORM" in
  gpu) export JAX_PLATFORMS="cuda,cpu" TRITON_INTERPRET=0; JAX_NAME=gpu ;;
  tpu) export JAX_PLATFORMS="tpu,cpu"; JAX_NAME=tpu ;;
  *) echo "unknown platform $PLATFORM (gpu or tpu)" >&2; exit 2 ;;
esac

if ! "$PY" -c "import jax, sys; sys.exit(jax.default_backend() != '$JAX_NAME')"; then
  echo "error: JAX sees no $PLATFORM (jax.default_backend() is not '$JAX_NAME')" >&2
  exit 2
fi

failed=()
stage() {  # stage NAME SECONDS COMMAND...
  local name="$1" limit="$2"; shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
}

MODEL=(--model llama-3-8b --load-format dummy --dtype bfloat16 --compilation-cache-dir none)
stage "device tests" 200 "$PY" -m pytest -q -ra -m "$PLATFORM" -p no:cacheprovider tests
stage "kernel benchmark" 120 "$PY" benchmarks/kernels.py --iters 5
if [ "$PLATFORM" = gpu ]; then
  stage "gguf matmul benchmark" 50 "$PY" benchmarks/gguf_matmul.py --iters 5
fi
stage "llama-3-8b latency" 110 $XLASERVE bench latency "${MODEL[@]}" --max-model-len 1024 \
  --max-num-seqs 16 --input-len 512 --output-len 64 --batch-sizes 1,16 --num-iters 2 \
  --num-iters-warmup 1
stage "llama-3-8b throughput" 110 $XLASERVE bench throughput "${MODEL[@]}" --max-model-len 1024 \
  --max-num-seqs 64 --max-num-batched-tokens 1024 --workload fixed:512/128 --num-prompts 128 \
  --repeats 1 --no-hf --no-batch1

if [ ${#failed[@]} -eq 0 ]; then
  echo "$PLATFORM check passed; results and log in $RESULTS/ ($LOG)"
  exit 0
fi
printf '%s check FAILED: %s\n' "$PLATFORM" "${failed[*]}" | tee -a "$LOG"
exit 1
