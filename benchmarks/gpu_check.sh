#!/usr/bin/env bash
# The prepared GPU check (issue 21): at most ~8 minutes on one H200, everything into $OUT.
#
#   benchmarks/gpu_check.sh [--model PATH_OR_NAME]     # on the lent GPU machine (device tool)
#   benchmarks/gpu_check.sh --dry-run                  # here: the same steps on the CPU, tiny model
#
# Steps, each under its own time limit so that one slow step cannot cost the others:
#   1. benchmarks/gpu_check.py: quickstart (RTN), GPTQ, LQ-LoRA (small grid), L4Q on the model with
#      device: cuda and again with device: cpu (RTN codes equal; perplexities within 1 %), then GPTQ of
#      the streamed 1.5 B synthetic Llama with its CUDA peak beside compress plan's;
#   2. benchmarks/kernel_speed.py --device cuda (percent of the bandwidth floor);
#   3. the tests that need CUDA (compiled Triton kernels, automatic kernel choice) and the device tests.
# The GPU machine has torch, triton, transformers, peft, scipy, safetensors, accelerate, but not
# pydantic, pulp, highspy, gguf: their wheels travel in the ignored .whl/ (see the device README)
# and are installed here with --no-deps, as is the project itself. SmolLM2's GGUF (98 MB) is above one
# call's 64 MiB: split it into .whl/smollm2.gguf.part-* (split -b 40M) and carry the parts over
# consecutive calls into /tmp/smollm2/ (a warm machine keeps /tmp), then pass
# --model /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DRY=0
MODEL=smollm2-135m
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --model) MODEL=$2; shift ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-$REPO/out/gpu_check}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
  DEVICE=cpu; MODEL=tiny-llama; LIMIT=600; RUNS=$OUT/runs
  KERNEL_ARGS=(--device cpu --shapes 128x128 --batches 1 --formats int4-g128 --repeats 1)
  TESTS=("$REPO/tests/test_device.py" -k "resolve or refused")
else
  DEVICE=cuda; LIMIT=220; RUNS=/tmp/gpu_check_runs  # checkpoints stay there: $OUT returns 8 files
  KERNEL_ARGS=(--device cuda --batches 1,16 --formats int4-g128,int3-g128,int2-g64,int8-g128,nf4)
  TESTS=("$REPO/tests/test_kernels.py" "$REPO/tests/test_kernel_dispatch.py" "$REPO/tests/test_device.py")
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  $PYTHON -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/compress . || exit 1
  export PYTHONPATH=/tmp/compress:$PYTHONPATH
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
fi

status=0
step() {  # step NAME SECONDS COMMAND...: run it with a limit, its output in $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
  [ $rc = 0 ] || status=1
}

step recipes "$LIMIT" $PYTHON benchmarks/gpu_check.py --device "$DEVICE" --model "$MODEL" --out "$RUNS" \
  $([ "$DRY" = 1 ] && echo --dry-run)
cp "$RUNS/gpu_check.md" "$RUNS/gpu_check.json" "$OUT/" 2>/dev/null
step kernel_speed 100 $PYTHON benchmarks/kernel_speed.py "${KERNEL_ARGS[@]}" --json "$OUT/kernel_speed.json"
# from /tmp: the repository root on sys.path would shadow Hugging Face's `kernels` with ours
step tests 140 bash -c 'cd /tmp && "$0" -c "import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))" -q -p no:cacheprovider "$@"' \
  $PYTHON "${TESTS[@]}"
exit $status
