#!/usr/bin/env bash
# qlora finetune --device cuda against PyTorch + PEFT (bench/cuda/torch_peft_finetune.py) with the
# same model, LoRA config, batch and sequence length, on the same GPU, one after the other:
#   bash bench/cuda/finetune_compare.sh OUTDIR DATA_FILE [steps] [batch] [seq]
# Needs build-cuda/qlora (bash bench/cuda/device_run.sh OUT tool). Writes OUTDIR/qlora.log,
# OUTDIR/qlora-run/ (adapter, loss.csv), OUTDIR/torch.log, OUTDIR/torch.json, and prints both
# tokens/s and peak memory lines. qlora's tok/s is the progress line's (a moving average of whole
# steps, optimizer included); its peak is what its DeviceBuffers held (torch's counterpart:
# max_memory_allocated), and the process total from cudaMemGetInfo.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${1:?usage: finetune_compare.sh OUTDIR DATA_FILE [steps] [batch] [seq]}
DATA=${2:?usage: finetune_compare.sh OUTDIR DATA_FILE [steps] [batch] [seq]}
STEPS=${3:-200}
BATCH=${4:-8}
SEQ=${5:-128}
MODEL=models/fortunes-base
R=8 ALPHA=16 DROPOUT=0.05 TARGET=all-linear
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv | tee "$OUT/gpu.txt"
./build-cuda/qlora finetune --device cuda --model "$MODEL" --data "$DATA" --quant nf4 --target "$TARGET" \
  --r $R --alpha $ALPHA --dropout $DROPOUT --steps "$STEPS" --batch "$BATCH" --seq "$SEQ" --eval-every 0 \
  --log-every 20 --out "$OUT/qlora-run" > "$OUT/qlora.log" 2>&1
echo "qlora rc=$?" | tee -a "$OUT/qlora.log"
./build-cuda/qlora finetune --device cuda --model "$MODEL" --data "$DATA" --quant bf16 --target "$TARGET" \
  --r $R --alpha $ALPHA --dropout $DROPOUT --steps "$STEPS" --batch "$BATCH" --seq "$SEQ" --eval-every 0 \
  --log-every 20 --out "$OUT/qlora-run-bf16" > "$OUT/qlora-bf16.log" 2>&1
echo "qlora bf16 rc=$?" | tee -a "$OUT/qlora-bf16.log"
python3 bench/cuda/torch_peft_finetune.py --model "$MODEL" --data "$DATA" --steps "$STEPS" --batch "$BATCH" \
  --seq "$SEQ" --r $R --alpha $ALPHA --dropout $DROPOUT --target "$TARGET" --json "$OUT/torch.json" \
  > "$OUT/torch.log" 2>&1
echo "torch rc=$?" | tee -a "$OUT/torch.log"
echo "== qlora (nf4) =="; grep -E "^step $STEPS/|peak device memory|before:|after:" "$OUT/qlora.log"
echo "== qlora (bf16) =="; grep -E "^step $STEPS/|peak device memory" "$OUT/qlora-bf16.log"
echo "== torch + peft (bf16) =="; grep "torch+peft" "$OUT/torch.log" || tail -20 "$OUT/torch.log"
