#!/usr/bin/env bash
# Build the NGC-based image and run the FocuSFT example inside it (one node, all GPUs).
# The image keeps the container's torch, Transformer Engine and flash-attn and installs
# megatron-focusft from its wheel with --no-deps (see Dockerfile and README "Container").
set -euo pipefail
IMAGE=${IMAGE:-megatron-focusft:latest}
docker build -t "$IMAGE" .
docker run --rm --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
    -v "${DATA_DIR:?set DATA_DIR to the folder holding your data and tokenizer}:/data" \
    -v "$PWD/runs:/workspace/megatron-focusft/runs" \
    -e DATA="/data/${DATA_FILE:-chats.jsonl}" -e TOKENIZER="/data/${TOKENIZER_DIR:-tokenizer}" \
    --entrypoint bash "$IMAGE" examples/pretrain_focusft.sh
