#!/usr/bin/env bash
# Every world-model config of one round of benchmarks/world_recipe_search.py, in parallel on one GPU,
# on a shared oracle + VAE (made by `prep` first unless DIR already holds them).
# On an H100 the 3000-step configs take ≈ 6–9 min when 4–8 run together.
#   bash benchmarks/world_recipe_search.sh ROUND [DIR]
set -e
ROUND=${1:?round: 1 or 2}
S=${2:-/tmp/world-search}
[ -d "$S/vae" ] || python benchmarks/world_recipe_search.py prep "$S" --device cuda | tee "$S.prep.log"
for name in $(python -c "import sys; sys.path.insert(0, 'benchmarks'); import world_recipe_search as w; print(*w.ROUNDS['$ROUND'][1])"); do
  OMP_NUM_THREADS=2 python benchmarks/world_recipe_search.py run "$S" "$name" --device cuda > "$S.$name.log" 2>&1 &
done
wait
grep -h '^{' "$S".*.log
