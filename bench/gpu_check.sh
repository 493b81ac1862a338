#!/usr/bin/env bash
# The first command on a CUDA machine, after `pip install -r requirements.txt`: every GPU path of the project run
# once, each section under its own time limit and none stopping the others, then one table (paste it into
# bench/README.md). About 7 minutes on one GPU. Exit status 1 when a section failed or ran out of time.
#   bash bench/gpu_check.sh                 # with CUDA: every section; without: a dry run (the device row alone)
#   bash bench/gpu_check.sh --cpu           # the CPU stand-ins of the sections that have one (gloo, tiny model)
#   GPU_CHECK_DIR=DIR bash bench/gpu_check.sh   # keep the runs and each section's log in DIR (default: a temp dir)
# Sections: the device; NCCL all-reduce bandwidth; a smoke run (torchrun on every GPU, ResNet-50 at 224 px, SyncBN
# across GPUs, bf16, the generated demo data, 60 steps); the ViT-B/16 rocket step; fp16 with the GradScaler;
# --augment_device cuda against cpu; gradient caching (ResNet-50, 512 in chunks of 128 against one pass of 128); the
# loader alone; evaluate.py on the smoke checkpoint; channels_last. The GPU-marked tests need the test requirements:
# pip install -r requirements-test.txt && python -m pytest -m gpu
cd "$(dirname "$0")/.." || exit 1
DIR=${GPU_CHECK_DIR:-$(mktemp -d)}
ROWS=()
FAILED=0

# section NAME LIMIT COMMAND: run the bash COMMAND for at most LIMIT seconds, its output in DIR/NAME.log (NAME's
# characters other than letters, digits, _ . - as _); the row:
# status (ok, skipped, failed, timeout), seconds, and the command's last `result: ...` line (else its last line)
section() {
  local name=$1 limit=$2 start=$SECONDS status result rc log="$DIR/${1//[^A-Za-z0-9_.-]/_}.log"
  timeout -k 15 "$limit" bash -c "$3" > "$log" 2>&1
  rc=$?
  result=$(sed -n 's/^result: //p' "$log" | tail -n 1)
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    status="timeout (${limit} s)"
  elif [ $rc -ne 0 ]; then
    status="failed ($rc)"
    result=${result:-$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c1-160)}
  elif [ "${result#skipped}" != "$result" ]; then
    status=skipped
  else
    status=ok
  fi
  case $status in failed* | timeout*) FAILED=1 ;; esac
  LAST=$status
  ROWS+=("$name|$status|$((SECONDS - start)) s|${result//|//}")
  echo "gpu_check: $name: $status" >&2
}

skip() {  # skip NAME WHY: a row for a section that has nothing to run here
  ROWS+=("$1|skipped|0 s|$2")
}

table() {
  echo "gpu_check: $(date -u '+%Y-%m-%d %H:%M UTC'), $MODE, $SECONDS s in all; logs in $DIR"
  echo '| section | status | time | result |'
  echo '|---|---|---|---|'
  local row name status seconds result
  for row in "${ROWS[@]}"; do
    IFS='|' read -r name status seconds result <<< "$row"
    echo "| $name | $status | $seconds | $result |"
  done
}

main() {
  mkdir -p "$DIR" || exit 1
  MODE=cuda
  section device 60 "python -m bench.gpu_check device"  # skipped: no CUDA here
  [ "$LAST" = skipped ] && MODE=dry
  [ "${1:-}" = --cpu ] && MODE=cpu
  local run="python -m torch.distributed.run --standalone" gpus=1 steps=60 r50 tiny
  [ $MODE = cuda ] && gpus=$(python -c 'import torch; print(torch.cuda.device_count())')
  r50="--model=resnet50 --image_size=224 --local_crop_size=224 --eval_every=0 --epochs=1 --overwrite"
  local chunked="python train.py --device=cuda $r50 --precision=bf16 --max_steps=20 --log_every=10"
  r50+=" --batch_size=128"
  tiny="--device=cpu --vision_layers=1 --text_layers=1 --image_size=32 --local_crop_size=32 --batch_size=8 --workers=1"
  tiny+=" --demo_train_size=96 --demo_val_size=40 --eval_every=0 --epochs=1 --overwrite"
  if [ $MODE = cuda ]; then
    section nccl 90 "$run --nproc_per_node=$gpus -m bench.gpu_check allreduce"
    section "smoke, $gpus GPU(s)" 180 "$run --nproc_per_node=$gpus train.py $r50 --precision=bf16 --log_every=20 \
      --demo_train_size=$((128 * gpus * steps)) --max_steps=$steps --output_dir=$DIR/smoke \
      && python -m bench.gpu_check run $DIR/smoke"
    section "vit_b16 rocket step" 120 "python -m bench.gpu_check rocket vit_b16"
    section "fp16 + GradScaler" 90 "python train.py --device=cuda --precision=fp16 --max_steps=40 --log_every=10 \
      --eval_every=0 --overwrite --output_dir=$DIR/fp16 && python -m bench.gpu_check run $DIR/fp16"
    local augment="python train.py --device=cuda $r50 --demo_train_size=$((128 * 40)) --max_steps=40 --log_every=10"
    section "augment_device cuda/cpu" 180 "$augment --augment_device=cpu --output_dir=$DIR/augment_cpu \
      && $augment --augment_device=cuda --output_dir=$DIR/augment_cuda \
      && python -m bench.gpu_check run $DIR/augment_cuda $DIR/augment_cpu"
    section "gradient caching 512 in chunks of 128" 240 "$chunked --batch_size=128 --demo_train_size=$((128 * 20)) \
      --output_dir=$DIR/one_pass && $chunked --batch_size=512 --chunk=128 --demo_train_size=$((512 * 20)) \
      --output_dir=$DIR/chunked && python -m bench.gpu_check run $DIR/chunked $DIR/one_pass"
    section loader 90 "python -m bench.gpu_check loader"
    section evaluate 90 "python -m bench.gpu_check evaluate $DIR/smoke/checkpoint.pt"
    section channels_last 120 "python -m bench.gpu_check channels_last"
  elif [ $MODE = cpu ]; then
    section "nccl (gloo stand-in)" 90 "$run --nproc_per_node=2 -m bench.gpu_check allreduce"
    section "smoke (2 CPU ranks, tiny)" 180 "$run --nproc_per_node=2 train.py $tiny --max_steps=6 --log_every=3 \
      --output_dir=$DIR/smoke && python -m bench.gpu_check run $DIR/smoke"
    skip "vit_b16 rocket step" "skipped: no CUDA"
    skip "fp16 + GradScaler" "skipped: no CUDA"
    skip "augment_device cuda/cpu" "skipped: no CUDA"
    section "gradient caching (2 CPU ranks, chunks of 4)" 180 "$run --nproc_per_node=2 train.py $tiny --chunk=4 \
      --max_steps=6 --log_every=3 --output_dir=$DIR/chunked && python -m bench.gpu_check run $DIR/chunked"
    section loader 90 "python -m bench.gpu_check loader"
    section evaluate 90 "python -m bench.gpu_check evaluate $DIR/smoke/checkpoint.pt"
    skip channels_last "skipped: no CUDA"
  else
    local name
    for name in nccl smoke "vit_b16 rocket step" "fp16 + GradScaler" "augment_device cuda/cpu" \
      "gradient caching" loader evaluate channels_last; do
      skip "$name" "skipped: no CUDA (bash bench/gpu_check.sh --cpu runs the CPU stand-ins)"
    done
  fi
  table
  return $FAILED
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # run, not sourced (a test sources it to call section and table)
  main "$@"
  exit $?
fi
