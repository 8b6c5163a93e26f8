#!/usr/bin/env bash
# Every world-model config of one round of benchmarks/world_recipe_search.py, in parallel on one GPU,
# on the oracle + VAE that `prep` trains once per texture geometry (skipped if DIR already has them).
# On an H100 the 3000-step configs take ≈ 6–9 min when 4–8 run together.
#   bash benchmarks/world_recipe_search.sh ROUND [DIR]
set -e
ROUND=${1:?round: 1, 2 or 3}
S=${2:-/tmp/world-search-$ROUND}
[ -f "$S/.prepared" ] || { python benchmarks/world_recipe_search.py prep "$S" --round "$ROUND" --device cuda | tee "$S.prep.log"; touch "$S/.prepared"; }
for name in $(python -c "import sys; sys.path.insert(0, 'benchmarks'); import world_recipe_search as w; print(*w.ROUNDS['$ROUND'])"); do
  OMP_NUM_THREADS=2 python benchmarks/world_recipe_search.py run "$S" "$name" --device cuda > "$S.$name.log" 2>&1 &
done
wait
grep -h '^{' "$S".*.log
