#!/usr/bin/env bash
# Every world-model config of benchmarks/world_recipe_search.py, in parallel on one GPU, after one
# shared oracle + VAE. On an H100 the 3000-step configs take ≈ 6–9 min when 4–8 run together.
set -e
S=${1:-/tmp/world-search}
python benchmarks/world_recipe_search.py prep "$S" --device cuda | tee "$S.prep.log"
for name in $(python -c "import sys; sys.path.insert(0, 'benchmarks'); import world_recipe_search as w; print(*w.CONFIGS)"); do
  OMP_NUM_THREADS=2 python benchmarks/world_recipe_search.py run "$S" "$name" --device cuda > "$S.$name.log" 2>&1 &
done
wait
grep -h '^{' "$S".*.log
