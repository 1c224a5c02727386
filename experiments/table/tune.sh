#!/usr/bin/env bash
# One shard setting of the table (e.g. "data/shards=dirichlet data.shards.alpha=0.1"): for each
# adaptive AME optimizer, choose its learning rate on the validation split (hparams_search=ame_lr:
# a 5-point grid, trials scored by val/acc on seed 0's experts, the value picked by
# scripts/best_trial.py, ties to the smaller lr; the held-out split is the same for
# every seed, since the strong regime fixes base_seed), then run the chosen value on seeds 0, 1, 2
# with the full evaluation. Those runs are marked tuned_on_validation (not data-free) and make a
# row of their own in the table. Extra arguments go to every run. A finished search is not rerun.
set -euo pipefail
cd "$(dirname "$0")/../.."
REGIME=${REGIME:-strong}  # strong | small_cnn | none (the data config's own model and training, e.g. GLD-23K's ViT-S)
REGIME_ARG=$([ "$REGIME" = none ] && echo "~regime" || echo "regime=$REGIME")
shards=$1
shift
slug=$(echo "$shards" | sed 's/[ /=]/_/g')
declare -A GRID=(
  [ame_adam]="choice(1e-5,3e-5,1e-4,3e-4,1e-3)"
  [ame_adamw]="choice(1e-5,3e-5,1e-4,3e-4,1e-3)"
  [ame_rmsprop]="choice(1e-5,3e-5,1e-4,3e-4,1e-3)"
  [ame_adagrad]="choice(1e-4,3e-4,1e-3,3e-3,1e-2)"
  [ame_adadelta]="choice(0.1,0.3,1,3,10)"
)
for agg in ame_adam ame_adamw ame_adagrad ame_adadelta ame_rmsprop; do
  dir="multirun/search/$REGIME/$slug/$agg"
  if [ ! -f "$dir/optimization_results.yaml" ]; then
    python run.py -m experiment=table hparams_search=ame_lr "$REGIME_ARG" $shards seed=0 aggregator="$agg" \
      '~hydra.sweeper.params.seed' '~hydra.sweeper.params.aggregator' \
      "aggregator.optimizer.lr=${GRID[$agg]}" hydra.sweep.dir="$dir" "$@"
  fi
  lr=$(python scripts/best_trial.py "$dir")  # the best val/acc; ties: the smaller lr
  echo "$agg: lr $lr chosen on the validation split ($dir/optimization_results.yaml)"
  python run.py -m experiment=table "$REGIME_ARG" $shards seed=0,1,2 aggregator="$agg" \
    aggregator.optimizer.lr="$lr" optimized_metric=val/acc "$@"
done
