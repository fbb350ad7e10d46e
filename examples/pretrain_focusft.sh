#!/usr/bin/env bash
# FocuSFT fine-tuning with torchrun, single node or multi-node.
#
# Single node, 8 GPUs:         bash examples/pretrain_focusft.sh
# Multi-node (run on each):    NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<node 0> bash examples/pretrain_focusft.sh
# Plain-SFT baseline:          EXTRA_ARGS="--training-mode sft --sft-mask causal" bash examples/pretrain_focusft.sh
# Parallel sizes:              TP=2 PP=2 CP=2 bash examples/pretrain_focusft.sh   (DP = GPUs / (TP x PP x CP))
# From a Hugging Face model:   focusft convert import-hf --hf-path HF_DIR --megatron-path ckpt/base
#                              PRETRAINED=ckpt/base bash examples/pretrain_focusft.sh
#                              focusft convert export-hf --megatron-path runs/focusft/checkpoints --hf-path out
#                              (the model's shape comes from the checkpoint; without PRETRAINED: preset 1b
#                              from scratch)
#
# DATA: chat JSONL/Parquet files with a `messages` column; TOKENIZER: a local Hugging Face
# tokenizer directory with a chat template (its vocabulary must fit the model's --vocab-size).
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
DATA=${DATA:?set DATA to your chat .jsonl/.parquet file(s)}
TOKENIZER=${TOKENIZER:?set TOKENIZER to a local Hugging Face tokenizer directory}
OUT=${OUT:-runs/focusft}
# The attention-metrics probe is not supported with context parallelism yet: off when CP > 1.
METRICS_INTERVAL=${METRICS_INTERVAL:-$([ "${CP:-1}" = 1 ] && echo 100 || echo 0)}
if [ -n "${PRETRAINED:-}" ]; then
    MODEL_ARGS=(--pretrained-checkpoint "$PRETRAINED" --finetune)
else
    MODEL_ARGS=(--model-preset 1b)
fi

torchrun --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
    pretrain_focusft.py \
    "${MODEL_ARGS[@]}" \
    --tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}" \
    --context-parallel-size "${CP:-1}" \
    --attention-backend flex --bf16 \
    --data-path $DATA --tokenizer-model "$TOKENIZER" --bad-sample-policy skip --data-cache-dir "$OUT/cache" \
    --seq-length "${SEQ_LENGTH:-4096}" --micro-batch-size 1 --global-batch-size "${GLOBAL_BATCH:-32}" \
    --train-iters "${TRAIN_ITERS:-1000}" --lr 1e-5 --min-lr 0 --lr-decay-style cosine --lr-warmup-fraction 0.1 \
    --weight-decay 0.01 --clip-grad 1.0 \
    --focusft-inner-steps 2 --focusft-inner-lr 1.0 --focusft-rank 32 --focusft-alpha 64 \
    --focusft-layer-fraction 0.35 \
    --save "$OUT/checkpoints" --load "$OUT/checkpoints" --save-interval "${SAVE_INTERVAL:-500}" \
    --log-interval 10 --tensorboard-dir "$OUT/tensorboard" --attention-metrics-interval "$METRICS_INTERVAL" \
    ${EXTRA_ARGS:-}
