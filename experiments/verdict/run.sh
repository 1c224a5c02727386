#!/usr/bin/env bash
# The verdict (issue 23), in resumable pieces. The verdict regime (conf/regime/verdict.yaml: a
# ResNet-20 base trained 60 epochs on 30,000 public images), two independently trained bases
# (base_seed 0 and 1), Dirichlet α = 0.5 shards, N = 4 and 8 experts, 5 expert seeds per base;
# every control and AME form tuned on each expert set's own validation split (tune.sh).
#
#   bash experiments/verdict/run.sh                 # everything, in order; a stopped run resumes
#   bash experiments/verdict/run.sh base 0          # one piece: train base 0 (and seed 0's N = 4 experts)
#   bash experiments/verdict/run.sh set 0 4 2       # one piece: base 0, N = 4, seed 2 (searches + rows)
#   bash experiments/verdict/run.sh tables          # the tables and the figure from what has finished
#   bash experiments/verdict/run.sh rerun           # every finished row again with this checkout's code:
#                                                   # identical? (rerun.md; the sets ran over many commits)
#
# Extra arguments after the piece go to every run (logger=none is added unless LOGGER=wandb).
# COMMIT=1: after each piece, the derived tables, figure and choices are committed (git add
# experiments/verdict; the results trees under multirun/ are not). Everything is cached under
# $AME_CACHE_DIR (bases, experts, reference metrics, corrupted sets).
set -euo pipefail
cd "$(dirname "$0")/../.."
LOG=()
[ "${LOGGER:-none}" = wandb ] || LOG=(logger=none)
OUT=experiments/verdict

tables() {
  [ -d multirun/verdict ] || return 0
  [ ! -f multirun/verdict/choices.tsv ] || cp multirun/verdict/choices.tsv "$OUT/choices.tsv"
  python scripts/make_tables.py multirun/verdict --each-set --contrast '^AME' validation --out "$OUT/table.md"
  python scripts/make_figures.py deltas multirun/verdict --out "$OUT/deltas.png" \
    --title "Verdict regime (ResNet-20, 30k public images), Dirichlet α = 0.5"
  for b in 0 1; do  # each base alone: is the pooled verdict the same on both?
    compgen -G "multirun/verdict/b${b}_*" > /dev/null || continue
    python scripts/make_tables.py multirun/verdict/b${b}_* --out "$OUT/base$b/table.md"
  done
}
commit() {
  [ "${COMMIT:-0}" = 1 ] || return 0
  tables
  git add "$OUT" && git commit -qm "experiments/verdict: $1" -- "$OUT" || true
}
piece_base() {  # the base (60 epochs × 30,000 images: ≈ 50 min on 2 free cores), with seed 0's N = 4 experts
  [ ! -f "multirun/verdict/b$1_n4/s0/soup/results.json" ] || return 0  # done: not run (nor committed) again
  python run.py -m experiment=verdict "base_seed=$1" data.shards.num_shards=4 seed=0 aggregator=soup \
    hydra.sweep.dir="multirun/verdict/b$1_n4/s0" hydra.sweep.subdir=soup "${@:2}"
  commit "base $1 trained"
}
piece_set() {  # one expert set: base, N, seed
  bash "$OUT/tune.sh" "$1" "$2" "$3" "${@:4}"
  commit "base $1, N = $2, seed $3"
}

case "${1:-all}" in
  base) piece_base "$2" "${LOG[@]}" "${@:3}" ;;
  set) piece_set "$2" "$3" "$4" "${LOG[@]}" "${@:5}" ;;
  tables) tables ;;
  rerun)  # the rows were made by the code of many commits (the tables warn): do they stay with this one?
    status=0  # the report grows outside the checkout (a tracked file changing would mark the reruns "uncommitted")
    python scripts/rerun.py multirun/verdict --out multirun/verdict-rerun > multirun/verdict-rerun.md || status=$?
    grep -q "^[0-9]* runs: " multirun/verdict-rerun.md || exit "$status"  # it stopped before its report: not copied
    cp multirun/verdict-rerun.md "$OUT/rerun.md"
    tail -3 "$OUT/rerun.md"
    exit "$status" ;;  # 1: some run differs or failed
  all)
    shift || true
    for b in 0 1; do piece_base "$b" "${LOG[@]}" "$@"; done
    for n in 4 8; do
      for s in 0 1 2 3 4; do
        for b in 0 1; do piece_set "$b" "$n" "$s" "${LOG[@]}" "$@"; done
      done
    done
    tables ;;
  *) echo "error: unknown piece '$1'; use base B, set B N S, tables, rerun or all" >&2; exit 2 ;;
esac
