#!/usr/bin/env bash
# A short FocuSFT training of the tiny model on synthetic chats (--mock-data), tensor-parallel over two
# CPU processes (gloo). Megatron's flag names; on a GPU node the same command uses NCCL, one GPU
# per process. Run from the repository root after `make venv`.
set -euo pipefail
NPROC=${NPROC:-2}
TP=${TP:-2}
.venv/bin/torchrun --standalone --nproc-per-node "$NPROC" pretrain_focusft.py --mock-data \
    --tensor-model-parallel-size "$TP" --train-iters "${STEPS:-10}" --seq-length 256 --micro-batch-size 2 \
    --lr 5e-4 --lr-warmup-iters 2 --tensorboard-dir "${OUTPUT_DIR:-runs/tp${TP}}/tensorboard"
