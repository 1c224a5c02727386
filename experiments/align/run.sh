#!/usr/bin/env bash
# Experts from independent initialisations on CIFAR-10 shards, averaged with and without weight
# matching (align=none vs align=weight_matching), aggregator=soup.
set -euo pipefail
# Every run logs to W&B (offline: <job dir>/wandb/; one W&B group per sweep directory). Add
# logger=none to skip it (about 3 s per job), or logger.mode=online to upload as you go.
cd "$(dirname "$0")/../.."
python run.py -m experiment=align "$@"
python scripts/make_tables.py multirun/align --out experiments/align/table.md
