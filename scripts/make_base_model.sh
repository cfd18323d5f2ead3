#!/usr/bin/env bash
# Recreates models/fortunes-base, the demo's embedded base model: a byte-level Llama-architecture
# model (vocab 256 = bytes, hidden 128, 4 layers, 4 heads / 2 KV heads, MLP 352, 256 positions,
# 0.8 M parameters) pretrained from random weights by `qlora pretrain` on the English text of
# Debian's fortunes collections, all but startrek (the demo's fine-tuning corpus) and the two that
# are not prose (ascii-art, translate-me). 3000 steps x 16 x 128 tokens (6.1 M tokens, ~2.7 passes
# over 2.3 M training bytes); about 25 minutes on 2 cores. Weights are saved as bf16.
#
#   bash scripts/make_base_model.sh [OUT_DIR]      (default: models/fortunes-base)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-models/fortunes-base}
# shellcheck source=deps.sh
source scripts/deps.sh cmake g++ libeigen3-dev nlohmann-json3-dev libbenchmark-dev catch2 fortunes
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc 2>/dev/null || echo 2)" --target qlora_cli qlora_make_toy
dir=/usr/share/games/fortunes
files=$(ls "$dir" | grep -v -e '\.dat$' -e '\.u8$' -e '^startrek$' -e '^ascii-art$' -e '^translate-me$' |
        sed "s|^|$dir/|" | paste -sd, -)
init=$(mktemp -d)
trap 'rm -rf "$init"' EXIT
build/qlora_make_toy "$init/init" --hidden 128 --layers 4 --intermediate 352 --heads 4 --kv-heads 2 --seed 0
build/qlora pretrain --model "$init/init" --data "$files" --out "$out" --steps 3000 --batch 16 --seq 128 \
  --lr 2e-3 --warmup 100 --eval-every 500 --eval-windows 32 --checkpoint-every 250 --log-every 100 --seed 0
