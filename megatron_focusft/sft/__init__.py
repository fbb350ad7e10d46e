"""The plain SFT training method (the baseline FocuSFT is measured against)."""

from megatron_focusft.sft.step import sft_forward_step

__all__ = ["sft_forward_step"]
