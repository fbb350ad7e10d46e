"""FocuSFT: bilevel SFT with per-sample fast weights on the top layers."""

from megatron_focusft.focusft.config import INNER_OBJECTIVES, FocusftConfig
from megatron_focusft.focusft.step import FocusftOutput, SeededFastWeights, focusft_forward, make_focusft_forward_step

__all__ = ["INNER_OBJECTIVES", "FocusftConfig", "FocusftOutput", "SeededFastWeights", "focusft_forward",
           "make_focusft_forward_step"]
