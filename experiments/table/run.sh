#!/usr/bin/env bash
# The comparison table on CIFAR-10 shards: shards iid and Dirichlet α ∈ {0.1, 0.5} × init shared
# and warm × seeds 0, 1, 2 × 7 aggregators (126 runs, 18 expert sets). Extra arguments go to every
# run (e.g. data=cifar100_shards). logger=none: W&B adds about 5 s per job.
set -euo pipefail
cd "$(dirname "$0")/../.."
python run.py -m experiment=table logger=none data/shards=iid "$@"
python run.py -m experiment=table logger=none data/shards=dirichlet data.shards.alpha=0.1,0.5 "$@"
python scripts/make_tables.py multirun/table --out experiments/table/table.md
