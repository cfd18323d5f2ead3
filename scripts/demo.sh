#!/usr/bin/env bash
# The demo (README "command 1"): builds the qlora tool, writes a small Hugging Face checkpoint
# and quantizes it to NF4, then shows both folders' sizes. Output goes to build/demo/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "== deps"
# shellcheck source=deps.sh
source scripts/deps.sh cmake g++ libeigen3-dev nlohmann-json3-dev libbenchmark-dev catch2

echo "== build (Release) into build/"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DQLORA_BUILD_EXAMPLES=ON >/dev/null
# Both programs come from examples/; say which one is missing rather than failing in make.
targets=$(cmake --build build --target help 2>/dev/null || true)
missing=()
for t in qlora_cli qlora_make_toy; do
  grep -Eq "(^|[ .:/])$t([ :]|$)" <<<"$targets" || missing+=("$t")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "demo: missing build targets: ${missing[*]} (the qlora tool is examples/qlora/*.cpp," \
       "the toy checkpoint writer is qlora_make_toy in examples/)" >&2
  exit 1
fi
cmake --build build -j "$(nproc 2>/dev/null || echo 2)" --target qlora_cli qlora_make_toy
qlora=build/qlora
make_toy=build/qlora_make_toy
[ -x "$make_toy" ] || make_toy=$(find build -maxdepth 3 -type f -name qlora_make_toy -perm -u+x | head -1)
for exe in "$qlora" "$make_toy"; do
  [ -n "$exe" ] && [ -x "$exe" ] || { echo "demo: ${exe:-qlora_make_toy} was not built" >&2; exit 1; }
done

out=build/demo/toy
rm -rf "$out" "$out-nf4"
mkdir -p build/demo
echo "== $make_toy $out"
"$make_toy" "$out"
echo "== $qlora quantize $out $out-nf4"
"$qlora" quantize "$out" "$out-nf4"
echo "== sizes"
ls -l "$out" "$out-nf4"
