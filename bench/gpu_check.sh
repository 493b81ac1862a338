#!/usr/bin/env bash
# On a CUDA machine: the GPU-marked tests, then the step benchmark at batch 128 (A = 2, bf16): images/s, peak
# memory and MFU of the full rocket step for resnet50 and vit_b16. Paste the output into bench/README.md.
# Usage: bash bench/gpu_check.sh  (budget: under 8 minutes on one H100/H200; each part has its own time limit)
set -euo pipefail
cd "$(dirname "$0")/.."
date -u '+%Y-%m-%d %H:%M UTC'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version())'
timeout 180 python -m pytest -q -m gpu tests/test_gpu.py
timeout 150 python -m bench.step --device cuda --batch 128 --steps 10 --warmup 3 --rows rocket --rocket_model resnet50
timeout 90 python -m bench.step --device cuda --batch 128 --steps 10 --warmup 3 --rows rocket --rocket_model vit_b16
echo "gpu_check: done in ${SECONDS}s"
