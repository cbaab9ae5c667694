#!/usr/bin/env bash
# On a machine with a CUDA GPU, in about 8 minutes: the tests marked for CUDA (bf16 training step,
# mixed-adapter batch, merge exactness, the server's worker on the GPU), then the training-step and
# serving benchmarks on the GPU. Figures go to docs/benchmarks-gpu.md (training steps) and
# docs/benchmarks-gpu-serve.json (serving). Run after scripts/install.sh:
#   bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU here: run this on a GPU machine')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 120 python -m pytest -m cuda -q tests/serve/test_cuda.py
timeout 180 python benchmarks/train_step.py --device cuda --dtype bf16 --models llama-small --steps 8 \
    --out docs/benchmarks-gpu.md
timeout 240 python benchmarks/serve.py --device cuda --dtype bf16 --store-size 2000 --resident 1000 \
    --requests-per-client 2 --max-tokens 32 --out docs/benchmarks-gpu-serve.json
echo "GPU check done: docs/benchmarks-gpu.md, docs/benchmarks-gpu-serve.json"
