#!/usr/bin/env bash
# AME's knobs, one at a time from AME-Adam (pivot=init, iterate pseudogradient, ζ=1, one epoch,
# fixed order) on the default CIFAR-10 shards, seeds 0, 1, 2.
set -euo pipefail
# Every run logs to W&B (offline: <job dir>/wandb/; one W&B group per sweep directory). Add
# logger=none to skip it (about 3 s per job), or logger.mode=online to upload as you go.
cd "$(dirname "$0")/../.."
run() { python run.py -m experiment=ablations "$@"; }
run aggregator.pivot=init,soup,first
run aggregator.pseudogradient=pivot
run aggregator.amplification=0.5,2,shard_size
run aggregator.epochs=2,4,8
run aggregator.order=shuffle
run aggregator.lr_schedule=harmonic aggregator.optimizer.lr=1e-3,1e-2
python scripts/make_tables.py multirun/ablations --out experiments/ablations/table.md
