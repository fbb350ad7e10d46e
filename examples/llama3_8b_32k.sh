#!/usr/bin/env bash
# FocuSFT of a Llama-3-8B shape at 32K tokens per packed row, one 8-GPU node: TP 4 with sequence
# parallelism x CP 2, full activation recomputation of every layer. Not run on GPUs by this
# project yet (no GPU was available); adjust the sizes to your cluster. Each flag is tested on CPU.
set -euo pipefail
export TP=4 CP=2 SEQ_LENGTH=32768 GLOBAL_BATCH=${GLOBAL_BATCH:-16}
EXTRA_ARGS="--model-preset llama3-8b --sequence-parallel --recompute-granularity full --recompute-method uniform \
--recompute-num-layers 1 ${EXTRA_ARGS:-}" bash "$(dirname "$0")/pretrain_focusft.sh"
