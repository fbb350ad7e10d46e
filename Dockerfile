# megatron-focusft in an NGC PyTorch container (a 2026 release; override with --build-arg).
# The container's torch, Transformer Engine and flash-attn are kept: NGC ships pre-release
# torch builds (e.g. 2.x.0a0+nv) that a normal resolve would try to replace, so every package
# that depends on torch is installed with --no-deps and its other needs are named explicitly.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.10-py3
FROM ${BASE_IMAGE}

WORKDIR /workspace/megatron-focusft
COPY pyproject.toml README.md ./
COPY megatron_focusft ./megatron_focusft
COPY kernels ./kernels
COPY patches ./patches
COPY examples ./examples
COPY pretrain_focusft.py ./

RUN pip install --no-cache-dir --no-deps "megatron-core>=0.19,<0.20" \
 && pip install --no-cache-dir "numpy>=1.26" packaging "tensorboard>=2.15" "datasets>=3.0" \
 && pip install --no-cache-dir --no-deps . \
 && python -c "import torch, megatron.core, megatron_focusft; print('torch', torch.__version__)"

ENTRYPOINT ["focusft"]
