"""Evaluation of trained models: long-context task generators, scoring, `focusft eval`, lm-eval."""
