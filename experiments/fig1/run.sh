#!/usr/bin/env bash
# Fig. 1 (the paper's design) on CIFAR-10 shards: 4 panels (GD = soup, Adagrad, AdamW, Adadelta),
# x = the experts' training epochs (1, 2, 4), one line per N ∈ {2, 4, 8, 16}, 3 learning rates per
# adaptive optimizer, one ensembling epoch. Extra arguments go to every run, e.g.
#   bash experiments/fig1/run.sh data=gld23k model=vit_s train=vit    # GLD-23K + ViT-S, on a GPU
# Experts are trained once per (N, epochs) and cached; the aggregator sweeps reuse them.
# logger=none: W&B adds about 5 s per job; drop it to log every run to W&B (offline by default).
set -euo pipefail
cd "$(dirname "$0")/../.."
run() { python run.py -m experiment=fig1 logger=none "$@"; }
run aggregator=soup "$@"
run aggregator=ame_adagrad aggregator.optimizer.lr=1e-3,1e-2,1e-1 "$@"
run aggregator=ame_adamw aggregator.optimizer.lr=1e-4,1e-3,1e-2 "$@"
run aggregator=ame_adadelta aggregator.optimizer.lr=0.1,1,10 "$@"
python scripts/make_figures.py fig1 multirun/fig1 --out experiments/fig1/fig1.png
