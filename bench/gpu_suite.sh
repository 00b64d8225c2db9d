#!/usr/bin/env bash
# The GPU checks of the collection in one command (under 9 minutes on one H100/H200: each part has a time
# limit, 260 + 150 + 2 x 60 s), most important first:
#   1. trl       our reward fit against TRL's RewardTrainer on the Qwen2-0.5B shape in one run (issue 3):
#                TRL at its defaults (gradient checkpointing off, as ours), ours at its defaults, ours with
#                compile + bf16 weights, twice each;
#   2. variants  our RewardModel's throughput and MFU in several settings (fused AdamW against torch's
#                foreach loop, fused RMSNorm against the model's own, bf16 weights);
#   3. smoke     the FSDP and bf16-true config fragments through cli.py, with an export from the checkpoint.
# PARTS=trl,variants picks parts. Each part has its own time limit, so one that hangs cannot take the others'
# time, and the logs are written as they go (tee), so a cut run keeps what it printed.
# For a GPU machine without a package registry, put the wheels in .whl (trl, datasets and the pyarrow it needs,
# jsonargparse and its extras: bash bench/fetch_gpu_wheels.sh fetches them): this script installs them into
# /tmp/site.
# $OUT receives at most 6 result files, so that a machine returning only a few files returns them all; work
# files (checkpoints, exports, logs of the smoke runs) go to $WORK.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_suite}
WORK=${WORK:-/tmp/gpu_suite_work}
PARTS=${PARTS:-trl,variants,smoke}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# what the parts import, checked before any GPU work: a missing package must cost seconds, not minutes
python3 -c "import jsonargparse, lightning, transformers" \
  || { echo "a package every part needs is missing: carry the wheels in .whl (README, Performance)"; exit 1; }
part() { [[ ",$PARTS," == *",$1,"* ]]; }
if part trl && ! python3 -c "import datasets; from trl import RewardConfig, RewardTrainer"; then
  echo "SKIPPING the TRL comparison: TRL's RewardTrainer or datasets cannot be imported (carry their wheels in .whl)"
  PARTS=${PARTS//trl/}
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__)"
} | tee "$OUT/gpu.txt"
quiet() { grep --line-buffered -vE "Warning:|warnings.warn\(|LOAD REPORT|MISSING|^Key|^---|^$"; }

if part trl; then
  timeout -k 15 "${TRL_SECONDS:-260}" python3 bench/reward_vs_trl.py --gpu-qwen2-0.5b --out "$WORK/trl" --json "$OUT/trl.json" 2>&1 \
    | quiet | tee "$OUT/trl.log"
  echo "trl: exit ${PIPESTATUS[0]}"
fi

if part variants; then
  timeout -k 15 "${VARIANT_SECONDS:-150}" python3 bench/reward_gpu.py --steps "${STEPS:-20}" --out "$OUT/reward_gpu.json" \
    --variants "${VARIANTS:-autocast,autocast_foreach,autocast_model_norms,bf16_weights}" 2>&1 | quiet | tee "$OUT/reward_gpu.log"
  echo "variants: exit ${PIPESTATUS[0]}"
fi

if part smoke; then
  tiny=(--model.init_args.model=tiny --data.init_args.train_size=256 --data.init_args.val_size=32 --data.init_args.test_size=32
        --trainer.max_steps=6 --trainer.val_check_interval=6 --trainer.enable_progress_bar=false)
  for strategy in fsdp bf16_true; do
    extra=(--config configs/trainer/single_gpu.yaml)
    [ "$strategy" = fsdp ] && extra=(--config configs/trainer/fsdp.yaml --config configs/trainer/bf16.yaml --trainer.devices=1)
    [ "$strategy" = bf16_true ] && extra+=(--config configs/trainer/bf16_true.yaml)
    timeout -k 15 "${SMOKE_SECONDS:-60}" python3 cli.py fit --config configs/reward/bt.yaml "${extra[@]}" "${tiny[@]}" \
      --trainer.logger.init_args.save_dir="$WORK/runs" --checkpoint.dirpath="$WORK/runs/$strategy/ck" \
      --export.dirpath="$WORK/runs/$strategy/export" --test_after_fit=true > "$WORK/$strategy.log" 2>&1
    status=$?
    { echo "$strategy: exit $status $(grep -o 'test/accuracy[^│]*│[^│]*' "$WORK/$strategy.log" | head -1 | tr -s ' ')"
      [ $status -ne 0 ] && tail -30 "$WORK/$strategy.log"
      python3 -c "from transformers import AutoModelForSequenceClassification as A; m = A.from_pretrained('$WORK/runs/$strategy/export'); print('$strategy export loads:', type(m).__name__, sum(p.numel() for p in m.parameters()), 'parameters')" 2>&1 | tail -1
    } | tee -a "$OUT/smoke.log"
  done
fi
