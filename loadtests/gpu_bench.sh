#!/usr/bin/env bash
# The engine bench on one NVIDIA GPU, with a CUDA build of vLLM (docs/deploy.md, "vLLM on a GPU").
#
#   loadtests/gpu_bench.sh                       # 256 requests, fp32, GPU 0
#   GPU=1 DTYPE=bf16 REQUESTS=512 loadtests/gpu_bench.sh
#
# It makes a virtual environment of its own (GPU_VENV, default .venv-gpu) with the project and vLLM's
# CUDA wheel (`vllm`, pinned to the release service/engine/vllm_prefix.py was checked against), builds
# the bench bundle when it is missing (needs the amazon-industrial data at DATA), and runs
# loadtests/bench_engine.py with the vLLM engine on the GPU: CUDA graphs on, the GPU memory share
# below, tensor parallel size 1. The reference and transformers rows run the same bundle on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."

GPU=${GPU:-0}
VENV=${GPU_VENV:-.venv-gpu}
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
BUNDLE=${BUNDLE:-var/amazon-bench}
DATA=${DATA:-../shared/data/amazon-industrial}
REQUESTS=${REQUESTS:-256}
DTYPE=${DTYPE:-fp32}
GPU_MEMORY=${GPU_MEMORY:-0.5}
OUT=${OUT:-var/gpu-bench-$(date -u +%Y%m%d-%H%M%S).json}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_bench: no NVIDIA GPU visible (nvidia-smi -L failed); nothing to run" >&2
    exit 2
fi
nvidia-smi -L

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
fi
if ! "$VENV/bin/python" -c "import vllm, sys; sys.exit(vllm.__version__ != '$VLLM_VERSION')" 2>/dev/null; then
    # vLLM's CUDA wheel brings its own torch; the project goes on top without replacing it.
    "$VENV/bin/pip" install --quiet "vllm==$VLLM_VERSION"
    "$VENV/bin/pip" install --quiet -e '.[dev,train]' 'transformers<5.20' 'fastapi<0.137'
fi
"$VENV/bin/python" - <<'EOF'
import torch, vllm
assert torch.cuda.is_available(), "torch in this environment has no CUDA"
print(f"vllm {vllm.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
EOF

if [ ! -f "$BUNDLE/manifest.json" ]; then
    "$VENV/bin/gream" bundle build --items "$DATA/items.jsonl" --out var/amazon-ids
    "$VENV/bin/python" loadtests/make_bench_bundle.py var/amazon-ids "$BUNDLE" --preset tiny
fi

CUDA_VISIBLE_DEVICES=$GPU HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    "$VENV/bin/python" loadtests/bench_engine.py --bundle "$BUNDLE" --requests "$REQUESTS" --rounds 4 \
    --engines reference,hf,vllm --dtype "$DTYPE" --histories "$DATA/test.jsonl" \
    --vllm-option enforce_eager=false \
    --vllm-option "gpu_memory_utilization=$GPU_MEMORY" \
    --vllm-option tensor_parallel_size=1 \
    --vllm-option block_size=16 \
    --json "$OUT"
echo "gpu_bench: rows in $OUT"
