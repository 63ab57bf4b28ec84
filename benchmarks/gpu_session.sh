#!/usr/bin/env bash
# Everything one GPU lease does, in one call: build, GPU parity tests, benchmarks. Each stage has a time limit,
# so a slow stage cannot starve the ones after it. All logs go to $OUT/session.log, the JSON files beside it
# (eight files in all: what the device tool brings back).
#
#   bash benchmarks/gpu_session.sh [STAGE ...]
#   default stages (most needed first; the round of 2026-11-30 built these without a GPU):
#           info build test-new (GPU tests of the deformable conv, training BatchNorm, compile/graphs, reliability
#           and SyncBatchNorm files) bench-dcn (bench_deform_conv.py, bf16 batch 16) bench-centernet-dcn
#           (CenterNet-DLA-34 DCN 512² b16, inference and training) bench-training-fused
#   other stages: bench-aggregate test bench-ida bench-bn bench-upsample bench-models bench-aggregate-compile
#           bench-training, bench-centernet, test-changed (the GPU tests of the folding, graph and CLI files only),
#           test-compile (GPU tests of torch.compile / CUDAGraphTraining), bench-compile (compile and captured-step rows)
#           issue 10 (training): profile-training, bench-training-fused (the fused BatchNorm training path forced),
#           convergence
#           issue 22 (detection): test-detection (GPU tests of dla_fast.detection), bench-end-to-end (CenterNet /
#           FairMOT / CenterTrack pipelines at batch 1 and 16; the peers' baseline needs OpenCV: carry an
#           opencv-python-headless wheel for the machine's python and pip install it first)
# Commit the JSON under benchmarks/results/<gpu>/ and make the tables with benchmarks/report.py.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/dla_fast_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(info build test-new bench-dcn bench-centernet-dcn bench-training-fused test-distributed)

run_stage() {  # run_stage NAME SECONDS COMMAND...
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "=== ${name}" | tee -a "$OUT/session.log"
  timeout "${limit}" "$@" > "$OUT/stage.log" 2>&1
  local rc=$?
  cat "$OUT/stage.log" >> "$OUT/session.log"
  tail -n 4 "$OUT/stage.log" | cut -c1-220
  rm -f "$OUT/stage.log"
  echo "=== ${name}: rc ${rc}, $((SECONDS - start)) s" | tee -a "$OUT/session.log"
}

for stage in "${STAGES[@]}"; do
  case "$stage" in
    info) run_stage info 30 bash -c "nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu \
          --format=csv; $PY -c 'import torch, triton; print(torch.__version__, triton.__version__)'" ;;
    build) run_stage build 240 bash -c "$PY -m pip install --no-build-isolation --no-deps -e . && $PY -m dla_fast info" ;;
    test) run_stage test 200 $PY -m pytest -q -p no:cacheprovider -rf --tb=short -m cuda tests/ ;;
    bench-aggregate) run_stage bench-aggregate 120 $PY benchmarks/bench_aggregate.py --batches 256 --extra "" \
          --dtypes bf16,fp32 --providers eager,eager_cl,triton,cuda --out "$OUT/aggregate.json" ;;
    bench-aggregate-compile) run_stage bench-aggregate-compile 90 $PY benchmarks/bench_aggregate.py --batches 256 \
          --extra "" --dtypes bf16 --providers compile --roots level2.root,level4.tree2.root \
          --out "$OUT/aggregate_compile.json" ;;
    bench-upsample) run_stage bench-upsample 60 $PY benchmarks/bench_upsample_merge.py --out "$OUT/upsample_merge.json" ;;
    bench-bn) run_stage bench-bn 60 $PY benchmarks/bench_batchnorm_act.py --out "$OUT/batchnorm_act.json" ;;
    bench-ida) run_stage bench-ida 80 $PY benchmarks/bench_ida.py --out "$OUT/ida.json" ;;
    bench-models) run_stage bench-models 420 bash -c "B='$PY -m dla_fast bench --model dla34 --dtype bf16 \
          --channels-last --no-progress'; G=eager,compile,dla_fast,eager_graph,dla_fast_graph; \
          \$B --batch 32 --providers \$G,compile_graph --json $OUT/models_cl_inference_b32.json; \
          \$B --batch 1 --providers eager,compile_graph,dla_fast,eager_graph,dla_fast_graph \
          --json $OUT/models_cl_inference_b1.json; \
          \$B --batch 256 --providers \$G --json $OUT/models_cl_inference_b256.json" ;;
    bench-training) run_stage bench-training 120 $PY -m dla_fast bench --model dla34 --dtype bf16 --channels-last \
          --no-progress --batch 256 --train --providers eager,dla_fast --json $OUT/models_cl_training_b256.json ;;
    bench-centernet) run_stage bench-centernet 200 $PY -m dla_fast bench --model centernet_dla34 --dtype bf16 \
          --channels-last --no-progress --batch 16 --size 512 \
          --providers eager,compile,dla_fast,eager_graph,dla_fast_graph --json $OUT/models_centernet_inference_b16.json ;;
    test-compile) run_stage test-compile 300 $PY -m pytest -q -p no:cacheprovider -rf --tb=short -m cuda \
          tests/test_compile.py tests/test_cuda_graph_training.py tests/test_host_caches.py ;;
    bench-compile) run_stage bench-compile 540 bash -c "B='$PY -m dla_fast bench --dtype bf16 --channels-last \
          --no-progress'; \
          \$B --model dla34 --batch 256 --providers compile,dla_fast_compile --json $OUT/compile_inference_b256.json; \
          \$B --model dla34 --batch 256 --train --providers eager,compile,dla_fast,dla_fast_compile \
          --json $OUT/compile_training_b256.json; \
          \$B --model dla34 --batch 32 --providers compile_graph,dla_fast_compile_graph,dla_fast_graph \
          --json $OUT/compile_graph_inference_b32.json; \
          \$B --model dla34 --batch 1 --providers compile_graph,dla_fast_compile_graph,dla_fast_graph \
          --json $OUT/compile_graph_inference_b1.json; \
          \$B --model centernet_dla34 --size 512 --batch 16 --providers compile,dla_fast_compile \
          --json $OUT/compile_centernet_inference_b16.json; \
          \$B --model centernet_dla34 --size 512 --batch 16 --train \
          --providers eager,compile,dla_fast,dla_fast_compile,eager_graph,dla_fast_graph \
          --json $OUT/compile_centernet_training_b16.json" ;;
    profile-training) run_stage profile-training 300 $PY benchmarks/profile_training.py --backend triton \
          --json "$OUT/profile_training.json" ;;
    bench-training-fused) run_stage bench-training-fused 120 $PY -m dla_fast bench --backend triton \
          --model dla34 --dtype bf16 --channels-last --no-progress --batch 256 --train --providers eager,dla_fast \
          --json $OUT/models_cl_training_b256_fused_bn.json ;;
    convergence) run_stage convergence 300 $PY benchmarks/convergence.py --json "$OUT/convergence.json" ;;
    test-new) run_stage test-new 200 $PY -m pytest -q -p no:cacheprovider -rf --tb=short -m cuda \
          tests/test_deform_conv.py tests/test_dcn_block.py tests/test_reliability_ops.py tests/test_compile.py \
          tests/test_cuda_graph_training.py tests/test_accelerate.py tests/test_aggregate.py ;;
    test-distributed) run_stage test-distributed 360 $PY -m pytest -q -p no:cacheprovider -rf --tb=short -m cuda \
          tests/test_sync_batchnorm.py ;;
    bench-dcn) run_stage bench-dcn 150 $PY benchmarks/bench_deform_conv.py --batches 16 --dtypes bf16 \
          --out "$OUT/deform_conv.json" ;;
    bench-centernet-dcn) run_stage bench-centernet-dcn 240 bash -c "B='$PY -m dla_fast bench --model centernet_dla34 \
          --dtype bf16 --channels-last --no-progress --batch 16 --size 512'; \
          \$B --providers eager,dla_fast,eager_graph,dla_fast_graph --json $OUT/models_centernet_dcn_inference_b16.json; \
          \$B --train --providers eager,dla_fast --json $OUT/models_centernet_dcn_training_b16.json; \
          \$B --train --backend triton --providers dla_fast --json $OUT/models_centernet_dcn_training_b16_fused_bn.json" ;;
    test-changed) run_stage test-changed 150 $PY -m pytest -q -p no:cacheprovider -rf --tb=short -m cuda \
          tests/test_folded.py tests/test_cuda_graph.py tests/test_cli.py tests/test_accelerate.py ;;
    test-detection) run_stage test-detection 150 $PY -m pytest -q -p no:cacheprovider -rf --tb=short -m cuda \
          tests/test_detection_decode.py tests/test_detection_preprocess.py tests/test_detection_detector.py ;;
    bench-end-to-end) run_stage bench-end-to-end 420 bash -c "B='$PY -m dla_fast bench --end-to-end --dtype bf16 \
          --no-progress --size 512'; \$B --model centernet_dla34 --json $OUT/end_to_end_centernet.json; \
          \$B --model centernet_dla34 --kind fairmot --json $OUT/end_to_end_fairmot.json; \
          \$B --model centertrack_dla34 --json $OUT/end_to_end_centertrack.json" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
