#!/usr/bin/env bash
# kvscope vs llama.cpp on the cpu-mini presets, both architectures, 1 thread (docs/performance.md).
#   make install llamacpp && tools/llamacpp/bench_cpu_mini.sh [none|int8|int4 ...]
# Writes docs/bench/cpu-mini-<arch>-<precision>-llamacpp.json; models go to $MODELS (/tmp/cpu-mini).
set -euo pipefail
cd "$(dirname "$0")/../.."
MODELS=${MODELS:-/tmp/cpu-mini}
QUANTS=("${@:-none}")
for arch in glm4_moe glm_moe_dsa; do
  [ -f "$MODELS/$arch/model.safetensors" ] ||
    .venv/bin/kvscope make-tiny --preset cpu-mini --arch "$arch" --out "$MODELS/$arch"
  for q in "${QUANTS[@]}"; do
    name=$([ "$q" = none ] && echo bf16 || echo "$q")
    .venv/bin/kvscope bench --model "$MODELS/$arch" --device cpu --dtype bfloat16 --quant "$q" \
      --threads 1 --peers llamacpp --no-cached --repeats 3 \
      --json "docs/bench/cpu-mini-$arch-$name-llamacpp.json"
  done
done
