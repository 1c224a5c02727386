#!/usr/bin/env bash
# Issue 15: where every aggregator lands when BatchNorm statistics follow the weights (the
# data-free rule) and when they are recomputed on held-out data (bn_reset=true, not data-free).
# One base and one expert set for all runs; each run evaluates one network. Extra arguments go to
# every run (e.g. logger=none).
set -euo pipefail
cd "$(dirname "$0")/../.."
run() { python run.py -m experiment=bn_stats bn_reset=false,true "$@"; }
run aggregator=soup,weighted_soup,ame_adam,ame_adagrad,task_arithmetic,ties,dare "$@"
run aggregator=ame_adam aggregator.optimizer.lr=0.0001 "$@"
# lr 0: the weights never leave the pivot (the warm base); the statistics must not either
run aggregator=ame_sgd aggregator.optimizer.lr=0 aggregator.lr_schedule=constant "$@"
python scripts/make_tables.py multirun/bn_stats --out experiments/bn_stats/table.md
