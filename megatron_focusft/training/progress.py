"""The console lines of a training run (rank 0). Each line says what its numbers count.

Progress, every --log-interval iterations:
  [ 50.0%] iteration 2/4 | lm loss 3.4650 | inner 6.1057 -> 3.4369, 0 steps skipped | lr 3.750e-04 |
  grad norm 6.813 | 120 real / 516 padded tok/s | 0.25 s/it | ETA 1 s
"real" tokens are the rows' sample tokens, "padded" every slot of the [b, seq_length] rows (what
the model computes; MFU uses it). The inner part appears for FocuSFT: the inner loss before and
after adaptation, and the inner steps skipped in the iteration by the inner-loop guard.
Attention metrics, every --attention-metrics-interval iterations, on a line of their own.
"""

from __future__ import annotations

from collections.abc import Mapping

ATTENTION_PREFIX = "attention/"


def progress_line(iteration: int, train_iters: int, stats: Mapping[str, float], eta_s: float) -> str:
    """stats: the iteration's (train_step stats plus learning_rate, real_tokens_per_s,
    tokens_per_s, iteration_s; FocuSFT's inner_* when present)."""
    inner = ""
    if "inner_loss_before" in stats:
        skipped = int(round(stats["inner_skipped_steps"]))
        inner = (f" | inner {stats['inner_loss_before']:.4f} -> {stats['inner_loss_after']:.4f}, "
                 f"{skipped} step{'' if skipped == 1 else 's'} skipped")
    return (f"[{100 * iteration / train_iters:5.1f}%] iteration {iteration:>6}/{train_iters} | "
            f"lm loss {stats['loss']:.4f}{inner} | lr {stats['learning_rate']:.3e} | "
            f"grad norm {stats['grad_norm']:.3f} | "
            f"{stats['real_tokens_per_s']:,.0f} real / {stats['tokens_per_s']:,.0f} padded tok/s | "
            f"{stats['iteration_s']:.2f} s/it | ETA {eta_s:,.0f} s")


def attention_line(iteration: int, stats: Mapping[str, float]) -> str | None:
    """The probe's attention metrics of this iteration, None when it measured none."""
    metrics = {key[len(ATTENTION_PREFIX):]: value for key, value in stats.items() if key.startswith(ATTENTION_PREFIX)}
    if not metrics:
        return None
    listed = " | ".join(f"{name.replace('_', ' ')} {value:.4f}" for name, value in sorted(metrics.items()))
    return f"    attention on the probe batch, iteration {iteration}: {listed}"
