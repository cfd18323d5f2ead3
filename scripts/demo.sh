#!/usr/bin/env bash
# The demo (README "command 1"): QLoRA fine-tuning in pure C++ on the embedded base model.
#
# models/fortunes-base is a small byte-level Llama (4 layers, hidden 128, 0.8 M parameters) that
# `qlora pretrain` trained on Debian's fortunes collections (scripts/make_base_model.sh recreates
# it). Here it is quantized to NF4 on load, gets LoRA on all linear layers, and is fine-tuned on a
# collection it has never seen (Star Trek quotes, from the `fortunes` package). The demo shows the
# held-out loss on the new text falling (and the old text's rising a little: forgetting), samples
# before and after, saves the PEFT adapter, reloads it, merges it into the weights, and checks that
# the merged model gives the same loss. Everything goes to build/demo/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "== deps"
# shellcheck source=deps.sh
source scripts/deps.sh cmake g++ libeigen3-dev nlohmann-json3-dev libbenchmark-dev catch2 fortunes gnuplot-nox

echo "== build (Release) into build/"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc 2>/dev/null || echo 2)" --target qlora_cli
qlora=build/qlora
[ -x "$qlora" ] || { echo "demo: $qlora was not built" >&2; exit 1; }

base=models/fortunes-base
new=/usr/share/games/fortunes/startrek   # the new corpus: not in the base model's training data
old=/usr/share/games/fortunes/wisdom     # one of the corpora the base was trained on
out=build/demo
rm -rf "$out"
mkdir -p "$out"
prompt='Captain, '
sample() {  # sample ARGS...: the same seed before and after, so the change is the adapter's
  "$qlora" generate --model "$base" --quant nf4 --prompt "$prompt" --max-new-tokens 200 \
           --temperature 0.7 --top-k 40 --seed 7 "$@" 2>/dev/null
  echo
}

echo
echo "== the base model: $base (NF4 on load), a sample before fine-tuning"
sample

echo
echo "== qlora finetune: NF4 base + LoRA r=8 on all linear layers, on $(basename "$new")"
start=$(date +%s)
"$qlora" finetune --model "$base" --quant nf4 --data "$new" --eval-data "$old" \
  --target all-linear --r 8 --alpha 16 --dropout 0.05 --lr 2e-3 --warmup 10 \
  --steps 120 --batch 8 --seq 128 --eval-every 40 --eval-windows 16 --log-every 20 \
  --out "$out/adapter" | tee "$out/finetune.log"
echo "(fine-tuning took $(( $(date +%s) - start )) s; loss curve: $out/adapter/loss.csv, $out/adapter/loss.png)"

echo
echo "== a sample after fine-tuning (same seed)"
sample --adapter "$out/adapter"

echo
echo "== reload the saved adapter and merge it"
loss_adapter=$("$qlora" eval --model "$base" --quant nf4 --adapter "$out/adapter" --text "$new" --seq 128 2>/dev/null)
"$qlora" merge --model "$base" --quant nf4 --adapter "$out/adapter" --out "$out/merged" \
  --requantize nf4 --requantized-out "$out/merged-nf4"
loss_merged=$("$qlora" eval --model "$out/merged" --text "$new" --seq 128 2>/dev/null)
loss_requant=$("$qlora" eval --model "$out/merged-nf4" --text "$new" --seq 128 2>/dev/null)
echo "loss on all of $(basename "$new") (its training and held-out entries):"
echo "  NF4 base + the reloaded adapter      ${loss_adapter#loss: }"
echo "  merged into dense fp32 weights       ${loss_merged#loss: }"
echo "  merged, then requantized to NF4      ${loss_requant#loss: }"

echo
echo "== summary"
grep -E '^(before|after):' "$out/finetune.log" | sed 's/^/  /'
echo "adapter: $out/adapter (PEFT), loss curve: $out/adapter/loss.csv, merged model: $out/merged"
