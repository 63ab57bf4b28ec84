#!/usr/bin/env bash
# One GPU verification in one call of the device tool: build, every GPU test, the headline measurements, and a
# final table of every ratio measured. Planned to end within 8 minutes of wall time on an H100 or H200 with the
# machine's own stack (python3, torch, Triton as installed there; nothing is installed but dla_fast itself);
# benchmarks/NOTES.md ("GPU session budget") says how each stage's share was set.
#
#   bash benchmarks/gpu_session.sh              # default: at most 8 minutes
#   bash benchmarks/gpu_session.sh --quick      # at most 4 minutes: the tests and paths never run on a GPU, fewer rows
#   bash benchmarks/gpu_session.sh --dry-run    # on a CPU (CI): the script's logic, tiny CPU runs, JSON and table
#   bash benchmarks/gpu_session.sh [--quick|--dry-run] STAGE ...   # only these stages, in this order
#   bash benchmarks/gpu_session.sh [--quick] --plan                 # print the stages' time limits, run nothing
#
# Stages, in order of need (each under its own time limit, and all under the session's deadline, so a slow
# stage cannot starve the summary):
#   info       GPU, driver, torch / Triton versions
#   build      pip install --no-build-isolation --no-deps -e . (the CUDA extension for TORCH_CUDA_ARCH_LIST=9.0)
#   test       every `cuda`-marked test (pytest -m cuda), the never-run files first; failures listed, not fatal
#   training   DLA-34 224² batch 256 bf16 training step: eager, dla_fast per training path (backend auto, triton,
#              cuda; the implicit-GEMM convs: provider dla_fast_conv_gemm), torch.compile
#   centernet  CenterNet-DLA-34 with deformable convs, 512² batch 16: inference (eager, dla_fast, CUDA graphs)
#              and training (eager, dla_fast per training path)
#   deform     the deformable conv op and CenterNet's DCN block against torchvision (bench_deform_conv.py, bf16 b16)
#   inference  DLA-34 inference at batch 256 / 32 / 1 (eager, dla_fast, CUDA graphs, torch.compile at 256)
#   summary    benchmarks/summary.py: the GPU tests' counts and failures, every ratio with its spread, the targets
#
# Files under $OUT (at most 8, what the device tool brings back): session.log (everything printed), tests.xml
# (pytest's junit report), training.json, centernet.json, deform.json, inference.json (dla_fast-bench records),
# summary.md. Commit the JSON under benchmarks/results/<gpu>/ with the commit they ran on.
set -uo pipefail
SCRIPT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
cd "$(dirname "$SCRIPT")/.."
OUT=${OUT:-/tmp/dla_fast_gpu_out}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}

# The GPU test files that never ran on a GPU come first, so that the time cap cuts the ones that passed before.
FIRST_TESTS=(test_batchnorm_act test_sync_batchnorm test_deform_conv test_compile test_cuda_graph_training
             test_aggregate test_cuda_graph test_folded test_extension test_cli test_bench_common)
QUICK_TESTS=(test_batchnorm_act test_sync_batchnorm test_deform_conv test_cuda_graph_training)
BENCH_FLAGS=(--dtype bf16 --channels-last --no-progress)

say() { echo "$*" | tee -a "$LOG"; }

test_files() {  # the test files of the test stage, in the order they run
  local names=("${FIRST_TESTS[@]}") path name
  if [ "$MODE" = quick ]; then
    names=("${QUICK_TESTS[@]}")
  else
    for path in $(grep -l "mark.cuda" tests/test_*.py); do  # the other files with GPU tests (no import of the rest)
      name=$(basename "$path" .py)
      [[ " ${FIRST_TESTS[*]} " == *" $name "* ]] || names+=("$name")
    done
  fi
  for name in "${names[@]}"; do echo "tests/$name.py"; done
}

fused_paths() {  # bench TAG ARGS... once per fused training path: Triton's BatchNorm, the extension's when built
  bench "$1_triton" "${@:2}" --providers dla_fast --backend triton
  if [ -e "$SCRATCH/extension_built" ] || [ "$MODE" = dry-run ]; then
    bench "$1_cuda" "${@:2}" --providers dla_fast --backend cuda
  fi
}

cpu_args() {  # a GPU bench run's arguments shrunk to a tiny CPU run of the same model and mode (dry run)
  local out=(--device cpu --batch 2 --size 32 --warmup 0 --iters 1 --no-progress) providers
  while [ $# -gt 0 ]; do
    case "$1" in
      --batch|--size|--warmup|--iters|--dtype|--backend|--json) shift 2 ;;
      --channels-last|--no-progress) shift ;;
      --providers) providers=$(tr , '\n' <<< "$2" | grep -xE 'eager|dla_fast' | paste -sd, -)
                   out+=(--providers "${providers:-eager}"); shift 2 ;;
      *) out+=("$1"); shift ;;
    esac
  done
  printf '%s\n' "${out[@]}"
}

bench() {  # bench TAG ARGS...: one `python -m dla_fast bench` run of the current stage, records to the scratch folder
  # (one run per path: a path failing on the GPU loses its own rows only; FAILED makes the stage's status 1)
  local tag=$1 args
  shift
  args=("${BENCH_FLAGS[@]}" "$@" --json "$SCRATCH/${STAGE}_${tag}.json")
  [ "$MODE" = quick ] && args=(--warmup 5 --iters 20 "${args[@]}")
  if [ "$MODE" = dry-run ]; then
    if [ -e "$SCRATCH/${STAGE}_ran" ]; then
      echo "dry run, not run: $PY -m dla_fast bench ${args[*]}"
      return 0
    fi
    touch "$SCRATCH/${STAGE}_ran"
    echo "dry run, instead of: $PY -m dla_fast bench ${args[*]}"
    mapfile -t args < <(cpu_args "${args[@]}")
    args+=(--json "$SCRATCH/${STAGE}_${tag}.json")
  fi
  echo "--- bench ${args[*]}"
  "$PY" -m dla_fast bench "${args[@]}" || { echo "--- bench failed: rc $?"; FAILED=1; }
}

needs_gpu() {  # in a dry run, say that the stage needs a GPU and what it would run; returns 0 when skipped
  if [ "$MODE" = dry-run ]; then
    echo "skipped: needs a GPU; would run: $*"
    return 0
  fi
  return 1
}

stage_body() {  # the commands of one stage (run under `timeout` by run_stage)
  case "$1" in
    info)
      command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total \
        --format=csv || echo "no nvidia-smi here"
      "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__,
                "triton", triton.__version__, "cuda", torch.cuda.is_available())'
      git log -1 --format='commit %H %s' 2>/dev/null || true ;;
    build)
      needs_gpu "$PY -m pip install --no-build-isolation --no-deps -e . (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)" \
        && return 0
      "$PY" -m pip install --no-build-isolation --no-deps -e . || return 1
      "$PY" -c 'import dla_fast._C as C; assert C.has_cuda(), "built without CUDA kernels"' \
        && touch "$SCRATCH/extension_built"
      "$PY" -m dla_fast info ;;
    test)
      local files
      mapfile -t files < <(test_files)
      if needs_gpu "$PY -m pytest -m cuda ${files[*]}"; then
        echo "test files: ${#files[@]}"
        return 0
      fi
      # SIGINT at the limit: pytest stops, lists the failures so far and writes its junit report
      timeout -s INT -k 10 $(( $2 > 30 ? $2 - 15 : 15 )) "$PY" -m pytest -q -p no:cacheprovider -rfE --tb=short -m cuda \
        --junitxml="$OUT/tests.xml" "${files[@]}"
      local rc=$?
      [ $rc -eq 5 ] && rc=0  # no test selected (a file list without GPU tests) is not a failure
      return $rc ;;
    training)
      bench auto --model dla34 --batch 256 --train --providers eager,dla_fast
      fused_paths fused --model dla34 --batch 256 --train
      [ "$MODE" = quick ] || bench conv_gemm --model dla34 --batch 256 --train --providers dla_fast_conv_gemm
      [ "$MODE" = quick ] || bench compile --model dla34 --batch 256 --train --providers compile
      [ -z "${FAILED:-}" ] ;;
    centernet)
      local graphs=,eager_graph,dla_fast_graph
      [ "$MODE" = quick ] && graphs=
      bench inference --model centernet_dla34 --size 512 --batch 16 --providers "eager,dla_fast$graphs"
      bench training --model centernet_dla34 --size 512 --batch 16 --train --providers eager,dla_fast
      [ "$MODE" = quick ] || fused_paths training_fused --model centernet_dla34 --size 512 --batch 16 --train
      [ -z "${FAILED:-}" ] ;;
    deform)
      if [ "$MODE" = dry-run ]; then
        echo "dry run, instead of: $PY benchmarks/bench_deform_conv.py --batches 16 --dtypes bf16 --ops deform_conv2d"
        "$PY" benchmarks/bench_deform_conv.py --smoke --dtypes fp32 --ops deform_conv2d --modes inference \
          --out "$SCRATCH/deform_op.json"
      else
        "$PY" benchmarks/bench_deform_conv.py --batches 16 --dtypes bf16 --ops deform_conv2d \
          --providers torchvision_autocast,dla_fast --out "$SCRATCH/deform_op.json"
      fi ;;
    inference)
      bench b256 --model dla34 --batch 256 --providers eager,dla_fast
      bench b32 --model dla34 --batch 32 --providers eager,dla_fast,eager_graph,dla_fast_graph
      bench b1 --model dla34 --batch 1 --providers eager_graph,dla_fast_graph
      bench b256_compile --model dla34 --batch 256 --providers compile
      [ -z "${FAILED:-}" ] ;;
    summary)
      local junit=()
      [ -e "$OUT/tests.xml" ] && junit=(--junit "$OUT/tests.xml")
      "$PY" benchmarks/summary.py table "$OUT" "${junit[@]}" --md "$OUT/summary.md" ;;
  esac
}

run_stage() {  # run_stage NAME: the stage under min(its limit, the time left before the deadline)
  local name=$1 start=$SECONDS left limit rc
  left=$((DEADLINE - SECONDS))
  limit=${LIMIT[$name]}
  [ "$name" != summary ] && [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    say "=== ${name}: skipped (${LIMIT[$name]} s planned, ${left} s left of the ${BUDGET} s budget)"
    return
  fi
  say "=== ${name} (limit ${limit} s, ${MODE})"
  timeout -k 10 "$limit" bash "$SCRIPT" --run-stage "$MODE" "$name" "$limit" "$SCRATCH" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  case "$name" in  # one records file per stage, from the runs that finished before the limit
    training|centernet|deform|inference)
      "$PY" benchmarks/summary.py merge "$OUT/$name.json" "$SCRATCH/${name}"_*.json 2>&1 | tee -a "$LOG" ;;
  esac
  say "=== ${name}: rc ${rc}$([ $rc -eq 124 ] && echo ' (time limit)'), $((SECONDS - start)) s"
}

if [ "${1:-}" = --run-stage ]; then  # internal: --run-stage MODE STAGE LIMIT SCRATCH, one stage under `timeout`
  MODE=$2 STAGE=$3 SCRATCH=$5
  stage_body "$3" "$4"
  exit $?
fi

MODE=full
PLAN=
STAGES=()
for arg in "$@"; do
  case "$arg" in
    --quick) MODE=quick ;;
    --plan) PLAN=1 ;;
    --dry-run) MODE=dry-run ;;
    -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "gpu_session.sh: error: unknown option $arg (use --quick, --dry-run or stage names)" >&2; exit 2 ;;
    *) STAGES+=("$arg") ;;
  esac
done
ALL_STAGES=(info build test training centernet deform inference summary)
[ ${#STAGES[@]} -eq 0 ] && STAGES=("${ALL_STAGES[@]}")
for stage in "${STAGES[@]}"; do
  [[ " ${ALL_STAGES[*]} " == *" $stage "* ]] || {
    echo "gpu_session.sh: error: unknown stage $stage; stages: ${ALL_STAGES[*]}" >&2; exit 2; }
done

# Seconds per stage (the limit of its `timeout`) and for the whole session; NOTES.md has the reasoning.
declare -A LIMIT
case "$MODE" in
  full)    BUDGET=480; LIMIT=([info]=10 [build]=75 [test]=140 [training]=90 [centernet]=55 [deform]=35 [inference]=45
                              [summary]=10) ;;
  quick)   BUDGET=240; LIMIT=([info]=10 [build]=75 [test]=55 [training]=45 [centernet]=25 [deform]=0 [inference]=0
                              [summary]=10) ;;
  dry-run) BUDGET=1200; LIMIT=([info]=120 [build]=60 [test]=60 [training]=240 [centernet]=240 [deform]=240
                               [inference]=240 [summary]=60) ;;  # CPU: generous, a shared CI machine may be slow
esac
# Stages before the summary end by DEADLINE: the budget less the summary's limit and MERGE_SLACK, the time the
# records merges after the bench stages take (~4 s each) outside the stages' limits. The summary always runs.
MERGE_SLACK=20
DEADLINE=$((SECONDS + BUDGET - LIMIT[summary] - MERGE_SLACK))
if [ -n "$PLAN" ]; then
  total=$MERGE_SLACK
  for stage in "${STAGES[@]}"; do
    echo "$stage ${LIMIT[$stage]}"
    total=$((total + LIMIT[$stage]))
  done
  echo "merges $MERGE_SLACK"
  echo "total $total of budget $BUDGET"
  exit 0
fi

mkdir -p "$OUT"
LOG="$OUT/session.log"
: > "$LOG"
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT

say "gpu_session.sh ${MODE}: stages ${STAGES[*]}; budget ${BUDGET} s; output ${OUT}"
for stage in "${STAGES[@]}"; do
  run_stage "$stage"
done
say "gpu_session.sh ${MODE}: done in ${SECONDS} s"
