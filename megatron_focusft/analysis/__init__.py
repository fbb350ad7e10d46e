"""Attention analysis: sink mass and context engagement (spec: shared/specs/focusft.md, Metrics); the demo's plots."""
