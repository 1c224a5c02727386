#!/usr/bin/env bash
# The comparison table on CIFAR-10 shards (strong regime by default; REGIME=small_cnn for the first
# results' small CNN): shards iid and Dirichlet α ∈ {0.1, 0.5} × seeds 0, 1, 2 × 12 aggregators
# (9 expert sets of 4, trained once and cached), then one row per AME optimizer with its learning
# rate chosen on the validation split (experiments/table/tune.sh; not data-free). Extra arguments go
# to every run (e.g. logger=none). A stopped run resumes from the cache.
set -euo pipefail
# Every run logs to W&B (offline: <job dir>/wandb/; one W&B group per sweep directory). Add
# logger=none to skip it (about 3 s per job), or logger.mode=online to upload as you go.
cd "$(dirname "$0")/../.."
REGIME=${REGIME:-strong}  # strong | small_cnn | none (the data config's own model and training, e.g. GLD-23K's ViT-S)
export REGIME  # tune.sh reads it too
REGIME_ARG=$([ "$REGIME" = none ] && echo "~regime" || echo "regime=$REGIME")
SHARDS=("data/shards=iid" "data/shards=dirichlet data.shards.alpha=0.5" "data/shards=dirichlet data.shards.alpha=0.1")
for shards in "${SHARDS[@]}"; do
  python run.py -m experiment=table "$REGIME_ARG" $shards "$@"
done
for shards in "${SHARDS[@]}"; do
  bash experiments/table/tune.sh "$shards" "$@"
done
# the strong regime's outputs here; another regime's in experiments/table/<regime>/rerun/ (the committed
# small_cnn/ files are the first results, made by an earlier version: not overwritten)
OUT=experiments/table$([ "$REGIME" = strong ] || echo "/$REGIME/rerun")
python scripts/make_tables.py "multirun/table/$REGIME" --out "$OUT/table.md"
python scripts/make_figures.py summary "multirun/table/$REGIME" --out "$OUT/table.png"
python scripts/make_figures.py deltas "multirun/table/$REGIME" --out "$OUT/deltas.png"
