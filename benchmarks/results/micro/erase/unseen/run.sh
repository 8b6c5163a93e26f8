#!/usr/bin/env bash
# Two world concepts that are not in the repo ("dotted", a texture; "circle", a shape), erased with
# the recommended recipe through the ordinary commands, 3 seeds, each evaluated on all 960 captions.
# Run from the repository root: bash benchmarks/results/micro/erase/unseen/run.sh OUT
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$1" && cd "$1"
for C in dotted circle; do
  erasure prompts build "$HERE/world-$C.yaml" --out p-$C
  erasure data generate --prompts p-$C/train.jsonl --model world:micro --out d-$C --images-per-prompt 2 --batch-size 64
  for s in 0 1 2; do
    erasure train --recipe "$HERE/../../../../../recipes/world/erase.yaml" --concept $C --forget_data d-$C/forget \
      --retain_data d-$C/retain --seed $s --output_dir out-$C-$s
  done
  erasure eval --suite "$HERE/micro-$C.yaml" --model world:micro --model out-$C-0 --model out-$C-1 \
    --model out-$C-2 --out eval-$C
done
