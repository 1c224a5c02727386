#!/usr/bin/env bash
# One expert set of the verdict (base_seed B, N experts, expert seed S): every control and AME form
# with its knobs chosen on this expert set's own validation split (val/acc on the 1,000 held-out
# images; the value picked by scripts/best_trial.py, ties to the smaller value), then the chosen
# values and the untuned references with the full evaluation (test set, 15 corruptions × 5
# severities × 500 images). Each row is one run, labelled (+label) so that expert sets whose choices
# differ pool into one row; the choices go to multirun/verdict/choices.tsv (untracked: a tracked file
# growing during the runs would mark every run's provenance "uncommitted changes"), which run.sh's
# tables step copies to experiments/verdict/choices.tsv. A finished search
# or run is not redone (resumable). Extra arguments go to every run (e.g. logger=none).
#   bash experiments/verdict/tune.sh 0 4 0 logger=none
set -euo pipefail
cd "$(dirname "$0")/../.."
B=$1 N=$2 S=$3
shift 3
EXTRA=("$@")
COMMON=(experiment=verdict "base_seed=$B" "data.shards.num_shards=$N" "seed=$S")
SEARCH=multirun/search/verdict/b${B}_n${N}/s$S
OUT=multirun/verdict/b${B}_n${N}/s$S
CHOICES=multirun/verdict/choices.tsv
mkdir -p multirun/verdict
# λN (in units of the soup's step: 0 the base, 1 the soup) → task arithmetic's λ for N experts
per_n() { python -c "import sys; print(','.join(f'{float(v) / $N:g}' for v in sys.argv[1].split(',')))" "$1"; }

search() {  # name, hparams_search config, aggregator, overrides...
  local name=$1 hs=$2 agg=$3
  shift 3
  [ -f "$SEARCH/$name/optimization_results.yaml" ] || python run.py -m "${COMMON[@]}" "hparams_search=$hs" \
    "aggregator=$agg" '~hydra.sweeper.params.seed' '~hydra.sweeper.params.aggregator' eval.test_subsample=500 \
    "hydra.sweep.dir=$SEARCH/$name" "$@" "${EXTRA[@]}"
}
row() {  # subdir, label ("" for an untuned reference), aggregator, overrides...
  local sub=$1 label=$2 agg=$3
  shift 3
  [ -f "$OUT/$sub/results.json" ] && return 0
  local tuned=()
  [ -n "$label" ] && tuned=(optimized_metric=val/acc "+label='$label'")
  python run.py -m "${COMMON[@]}" "aggregator=$agg" "$@" "${tuned[@]}" "hydra.sweep.dir=$OUT" \
    "hydra.sweep.subdir=$sub" "${EXTRA[@]}"
  [ -z "$label" ] || printf '%s\t%s\t%s\t%s\t%s\n' "$B" "$N" "$S" "$sub" "$*" >> "$CHOICES"
}
best() { python scripts/best_trial.py "$SEARCH/$1" "${@:2}"; }

# untuned references (the soup; the output ensemble is reported by every run)
row soup "" soup
row weighted_soup "" weighted_soup
# task arithmetic's λ = the base↔soup interpolation (one algorithm); "base or soup" = the same grid at λN ∈ {0, 1}
search ta ta_scaling task_arithmetic "aggregator.scaling=choice($(per_n 0,0.25,0.5,0.75,1,1.5,2))"
row ta "task arithmetic = base↔soup interpolation (λ)" task_arithmetic \
  "aggregator.scaling=$(best ta --param aggregator.scaling)"
row base_or_soup "base or soup (chosen on validation)" task_arithmetic \
  "aggregator.scaling=$(best ta --param aggregator.scaling --among "$(per_n 0,1)")"
search ties ties_grid ties
# shellcheck disable=SC2046  # best prints "key=value key=value": one override each
row ties "TIES (density, λ)" ties $(best ties --param aggregator.density --param aggregator.scaling)
search dare dare_grid dare "aggregator.scaling=choice($(per_n 0.5,0.75,1,1.25,1.5))"
# shellcheck disable=SC2046
row dare "DARE (density, λ)" dare $(best dare --param aggregator.density --param aggregator.scaling)
# AME as in the table (iterate pseudogradient, pivot = the base, one epoch; Adam ≡ AdamW here), lr tuned
search ame_adam ame_lr ame_adam
row ame_adam "AME-Adam, table form (lr)" ame_adam "aggregator.optimizer.lr=$(best ame_adam)"
# the paper's AME: pivot pseudogradient, Adam, 1–4 epochs, pivot = soup or the base; lr × epochs tuned
for pivot in soup init; do
  search "ame_paper_$pivot" ame_paper ame_adam "aggregator.pivot=$pivot"
  # shellcheck disable=SC2046
  row "ame_paper_$pivot" "AME-Adam, paper form, pivot $pivot (lr, epochs)" ame_adam "aggregator.pivot=$pivot" \
    aggregator.pseudogradient=pivot $(best "ame_paper_$pivot" --param aggregator.optimizer.lr --param aggregator.epochs)
done
