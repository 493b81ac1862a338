#!/usr/bin/env bash
# On a CUDA machine: the GPU-marked tests, then the step benchmark at batch 128 (A = 2, bf16).
# Usage: bash bench/gpu_check.sh  (about 5 minutes on one H100/H200)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m pytest -q -m gpu tests/test_gpu.py
python -m bench.step --device cuda --batch 128 --steps 10 --warmup 3 --rows resnet50,vit_b16,rocket --rocket_model resnet50
python -m bench.step --device cuda --batch 128 --steps 10 --warmup 3 --rows rocket --rocket_model vit_b16
