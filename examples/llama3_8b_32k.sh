#!/usr/bin/env bash
# FocuSFT of a Llama-3-8B shape at 32K tokens per packed row, one 8-GPU node, TP 8.
# (Context parallelism for these masks is not wired into training yet; TP 8 keeps the
# activations of a 32K row within 80 GB only with a small micro-batch. Adjust to your cluster.)
set -euo pipefail
export TP=8 SEQ_LENGTH=32768 GLOBAL_BATCH=${GLOBAL_BATCH:-16}
EXTRA_ARGS="--model-preset llama3-8b ${EXTRA_ARGS:-}" bash "$(dirname "$0")/pretrain_focusft.sh"
