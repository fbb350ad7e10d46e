#!/usr/bin/env bash
# The demo's short training of the tiny model, tensor-parallel over two CPU processes (gloo).
# Megatron's flag names; on a GPU node the same command uses NCCL, one GPU per process.
# Run from the repository root after `make venv`.
set -euo pipefail
NPROC=${NPROC:-2}
TP=${TP:-2}
.venv/bin/torchrun --standalone --nproc-per-node "$NPROC" -m megatron_focusft.cli demo \
    --tensor-model-parallel-size "$TP" --steps "${STEPS:-10}" --output-dir "${OUTPUT_DIR:-runs/demo_tp${TP}}"
