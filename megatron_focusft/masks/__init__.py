"""Segment masks: one representation for every attention mask of the project."""

from megatron_focusft.masks.dense import dense_mask
from megatron_focusft.masks.layout import MASK_KINDS, MaskKind, SegmentMask, run_bounds, segment_mask

__all__ = ["MASK_KINDS", "MaskKind", "SegmentMask", "dense_mask", "run_bounds", "segment_mask"]
