"""The training methods of `--training-mode`: one registration each (engine/method.py)."""

from __future__ import annotations

from megatron_focusft.blockattn.method import BLOCK_DISTILL, BLOCK_SFT
from megatron_focusft.engine.method import TrainingMethod
from megatron_focusft.focusft.method import FOCUSFT
from megatron_focusft.sft.method import SFT

METHODS: dict[str, TrainingMethod] = {method.name: method for method in (FOCUSFT, SFT, BLOCK_SFT, BLOCK_DISTILL)}
