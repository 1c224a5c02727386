#!/usr/bin/env bash
# The comparison table on CIFAR-10 shards: shards iid and Dirichlet α ∈ {0.1, 0.5} × init warm
# (experts fine-tune a base trained on 10k public images, lr 0.01) and shared (experts train from
# one random init, lr 0.05) × seeds 0, 1, 2 × 7 aggregators: 126 runs, 18 expert sets. Extra
# arguments go to every run (e.g. data=cifar100_shards).
set -euo pipefail
# Every run logs to W&B (offline: <job dir>/wandb/; one W&B group per sweep directory). Add
# logger=none to skip it (about 3 s per job), or logger.mode=online to upload as you go.
cd "$(dirname "$0")/../.."
run() { python run.py -m experiment=table "$@"; }
for shards in "data/shards=iid" "data/shards=dirichlet data.shards.alpha=0.1,0.5"; do
  run $shards train.init=warm "$@"
  run $shards train.init=shared train.optimizer.lr=0.05 "$@"
done
python scripts/make_tables.py multirun/table --out experiments/table/table.md
python scripts/make_figures.py summary multirun/table --out experiments/table/table.png
