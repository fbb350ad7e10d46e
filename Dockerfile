# megatron-focusft in an NGC PyTorch container (a 2026 release; override with --build-arg).
# The container's torch, Transformer Engine and flash-attn are kept: NGC ships pre-release
# torch builds (e.g. 2.x.0a0+nv) that a normal resolve would try to replace, so every package
# that depends on torch is installed with --no-deps and its other needs are named explicitly:
# the dependencies of pyproject.toml (tests/test_packaging.py checks that none is missing here).
# Not built in CI: the machines that run the tests cannot reach nvcr.io.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:26.10-py3
FROM ${BASE_IMAGE}

# megatron-focusft itself: its wheel, built and installed with --no-deps as
# tests/test_packaging.py does. The sources stay out of the work dir, so everything that runs
# there imports the installed wheel.
COPY pyproject.toml setup.py README.md /tmp/megatron-focusft/
COPY megatron_focusft /tmp/megatron-focusft/megatron_focusft
COPY kernels /tmp/megatron-focusft/kernels
COPY patches /tmp/megatron-focusft/patches
RUN pip install --no-cache-dir --no-deps "megatron-core>=0.19,<0.20" \
 && pip install --no-cache-dir "numpy>=1.26" "packaging" "tensorboard>=2.15" "datasets>=3.0" "psutil" "matplotlib>=3.8" \
    "transformers>=5.0" "safetensors>=0.4" "tqdm>=4.66" \
 && pip wheel --no-cache-dir --no-deps -w /tmp/wheels /tmp/megatron-focusft \
 && pip install --no-cache-dir --no-deps /tmp/wheels/megatron_focusft-*.whl \
 && rm -rf /tmp/megatron-focusft /tmp/wheels

WORKDIR /workspace/megatron-focusft
COPY examples ./examples
COPY pretrain_focusft.py ./

# The versions the image brings (in the build log) and pyproject's torch floor, which --no-deps skips.
RUN pip list 2>/dev/null | grep -i -E "^(torch|transformer.engine|flash.attn|megatron)" \
 && python -c "import torch, megatron.core, megatron_focusft.masks, megatron_focusft.training.pretrain; \
from packaging.version import Version; assert Version(torch.__version__) >= Version('2.11'), torch.__version__" \
 && focusft --help > /dev/null

ENTRYPOINT ["focusft"]
