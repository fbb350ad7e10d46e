"""The demo's plots (megatron_focusft.analysis.plots) from plain run records, without the demo."""

from __future__ import annotations

from megatron_focusft.analysis.plots import _running_mean, write_plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _record(loss: list[float], inner: bool) -> dict:
    points = [{"iteration": i, "sink_mass": 0.1, "sink_mass_first4": 0.2, "context_engagement": 0.5} for i in (2, 4)]
    scores = {"accuracy": 0.5, "token_accuracy": 0.7, "baseline_accuracy": 0.1, "baseline_token_accuracy": 0.3}
    record = {"loss": loss, "attention_metrics_during_training": points,
              "eval": {str(n): dict(scores) for n in (64, 128)}}
    if inner:
        record["inner_loss_before"] = [x + 0.5 for x in loss]
    return record


def test_write_plots_writes_three_pngs(tmp_path):
    runs = {"sft": _record([3.0, 2.5, 2.0, 1.8], inner=False), "focusft": _record([3.0, 2.4, 2.1, 1.7], inner=True)}
    paths = write_plots(tmp_path, runs, {"sft": "SFT", "focusft": "FocuSFT"}, steps=4, seq_length=64,
                        eval_lengths=(64, 128), context_free_loss=1.0)
    assert paths == [str(tmp_path / name) for name in ("loss_curves.png", "attention_metrics.png",
                                                       "accuracy_by_length.png")]
    for path in paths:
        assert (tmp_path / path.rsplit("/", 1)[1]).read_bytes()[:8] == PNG_SIGNATURE


def test_running_mean_is_over_the_trailing_window():
    assert _running_mean([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
