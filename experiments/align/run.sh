#!/usr/bin/env bash
# Experts from independent initialisations on CIFAR-10 shards, averaged with and without weight
# matching (align=none vs align=weight_matching), aggregator=soup.
set -euo pipefail
cd "$(dirname "$0")/../.."
python run.py -m experiment=align logger=none "$@"
python scripts/make_tables.py multirun/align --out experiments/align/table.md
