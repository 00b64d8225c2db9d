#!/usr/bin/env bash
# The GPU checks of the collection in one go (about 5 minutes on one H100/H200): reward-model throughput
# and MFU on the Qwen2-0.5B shape (bf16 autocast, 8-bit AdamW, bf16 weights + compile), and the FSDP and
# bf16-true config paths through cli.py with an export from the FSDP checkpoint, and our trainer against
# TRL's RewardTrainer in the same run (default settings, then compile + bf16 weights; needs the `bench`
# extra, i.e. trl). Results go to $OUT (or runs/gpu_suite).
set -uo pipefail
OUT=${OUT:-runs/gpu_suite}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__)" | tee -a "$OUT/gpu.txt"

python3 bench/reward_gpu.py --variants "${VARIANTS:-autocast,autocast_foreach,autocast_model_norms,autocast_adamw8bit,bf16_weights,bf16_weights_compile}" \
  --steps "${STEPS:-20}" --out "$OUT/reward_gpu.json" 2>&1 | grep -vE "Warning|warn|LOAD REPORT|MISSING|^Key|^---|^$" | tee "$OUT/reward_gpu.log"

tiny=(--model.init_args.model=tiny --data.init_args.train_size=256 --data.init_args.val_size=32 --data.init_args.test_size=32
      --trainer.max_steps=6 --trainer.val_check_interval=6 --trainer.enable_progress_bar=false)
for strategy in fsdp bf16_true; do
  extra=(--config configs/trainer/single_gpu.yaml)
  [ "$strategy" = fsdp ] && extra=(--config configs/trainer/fsdp.yaml --config configs/trainer/bf16.yaml --trainer.devices=1)
  [ "$strategy" = bf16_true ] && extra+=(--config configs/trainer/bf16_true.yaml)
  python3 cli.py fit --config configs/reward/bt.yaml "${extra[@]}" "${tiny[@]}" \
    --trainer.logger.init_args.save_dir="$OUT/runs" --checkpoint.dirpath="$OUT/runs/$strategy/ck" \
    --export.dirpath="$OUT/runs/$strategy/export" --test_after_fit=true > "$OUT/$strategy.log" 2>&1
  echo "$strategy: exit $? $(grep -o 'test/accuracy[^│]*│[^│]*' "$OUT/$strategy.log" | head -1 | tr -s ' ')"
  python3 -c "from transformers import AutoModelForSequenceClassification as A; m = A.from_pretrained('$OUT/runs/$strategy/export'); print('$strategy export loads:', type(m).__name__, sum(p.numel() for p in m.parameters()), 'parameters')"
done

if python3 -c "import trl" 2>/dev/null; then
  for flags in "" "--compile --bf16-weights"; do
    name=trl${flags:+_compile_bf16}
    python3 bench/reward_vs_trl.py --gpu-qwen2-0.5b $flags --json "$OUT/$name.json" 2>&1 \
      | grep -vE "Warning|warn" | tail -15 | tee "$OUT/$name.log"
  done
else
  echo "trl not installed: skipping the TRL comparison (pip install -e '.[bench]')"
fi
