"""Evaluation of trained models (for now: teacher-forced answer scoring on the long-context task)."""

from megatron_focusft.evaluation.teacher_forced import answer_spans, context_free_guess, evaluate, probe_batch

__all__ = ["answer_spans", "context_free_guess", "evaluate", "probe_batch"]
