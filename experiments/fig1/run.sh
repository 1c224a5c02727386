#!/usr/bin/env bash
# Fig. 1 (the paper's design): 4 panels (GD = soup, Adagrad, AdamW, Adadelta), x = the experts'
# training epochs (1, 2), one line per N ∈ {2, 4, 8, 16}, 3 learning rates per adaptive
# optimizer, one ensembling epoch. REGIME picks the base and experts (strong: the 75.6 % ResNet-20
# base, the default; small_cnn: the first results' small CNN), DATA the data config (default
# cifar10_shards); further arguments go to every run:
#   bash experiments/fig1/run.sh                                  # CIFAR-10 shards, strong regime, CPU
#   REGIME=small_cnn bash experiments/fig1/run.sh                 # the small-CNN regime
#   DATA=gld23k bash experiments/fig1/run.sh model.pretrained=/path/to/vit_s.safetensors   # GLD-23K + ViT-S, GPU
# Experts are trained once per (N, epochs) and cached; the aggregator sweeps reuse them; a stopped
# sweep resumes from the cache.
set -euo pipefail
# Every run logs to W&B (offline: <job dir>/wandb/; one W&B group per sweep directory). Add
# logger=none to skip it (about 3 s per job), or logger.mode=online to upload as you go.
cd "$(dirname "$0")/../.."
DATA=${DATA:-cifar10_shards}
REGIME=${REGIME:-strong}  # strong | small_cnn | none (the data config's own model and training, e.g. GLD-23K's ViT-S)
REGIME_ARG=$([ "$REGIME" = none ] && echo "~regime" || echo "regime=$REGIME")
run() { python run.py -m experiment=fig1 data="$DATA" "$REGIME_ARG" "$@"; }
run aggregator=soup "$@"
run aggregator=ame_adagrad aggregator.optimizer.lr=1e-3,1e-2,1e-1 "$@"
run aggregator=ame_adamw aggregator.optimizer.lr=1e-4,1e-3,1e-2 "$@"
run aggregator=ame_adadelta aggregator.optimizer.lr=0.1,1,10 "$@"
# the strong regime's outputs here; another regime's in experiments/fig1/<regime>/rerun/ (the committed
# small_cnn/ files are the first results, made by an earlier version: not overwritten)
OUT=experiments/fig1$([ "$REGIME" = strong ] || echo "/$REGIME/rerun")
python scripts/make_figures.py fig1 "multirun/fig1/$DATA/$REGIME" --out "$OUT/fig1_$DATA.png"
