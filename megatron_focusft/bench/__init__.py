"""Benchmarks run by `focusft bench ...` (figures go to docs/BENCHMARKS.md, never into tests)."""
