"""FocuSFT / SFT training on Megatron-Core. Launch with torchrun, e.g.

    torchrun --nproc-per-node 8 pretrain_focusft.py --tensor-model-parallel-size 2 --seq-length 8192 \
        --micro-batch-size 1 --global-batch-size 32 --train-iters 1000 --lr 1e-5 --data-path chats.jsonl ...

See `python pretrain_focusft.py --help` and examples/pretrain_focusft.sh.
"""

import sys

from megatron_focusft.training.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
