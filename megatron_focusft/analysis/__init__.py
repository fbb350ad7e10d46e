"""Attention analysis: sink mass and context engagement (the FocuSFT paper's metrics, arXiv 2605.09932); the demo's plots."""
