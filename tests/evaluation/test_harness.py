"""`focusft eval`: the harness scores what a predictor says (oracle 100, wrong 0), writes
results.json / predictions.jsonl / plots / a comparison; on a tiny model, an HF directory and
its Megatron import give the same predictions and scores, in both prefill modes and with
test-time adaptation."""

from __future__ import annotations

import json

import pytest

from megatron_focusft.cli import main as cli_main
from megatron_focusft.data.tokenizer import ByteChatTokenizer
from megatron_focusft.evaluation.harness import (
    Prediction,
    comparison_table,
    plot_results,
    run_evaluation,
    write_results,
)
from megatron_focusft.evaluation.long_context_tasks import generate_samples

TOKENIZER = ByteChatTokenizer()


def _samples():
    count = lambda text: len(TOKENIZER.encode(text))  # noqa: E731
    return [s for task in ("niah_single_noise", "vt") for length in (800, 1600)
            for s in generate_samples(task, length, 4, count)]


def test_oracle_and_wrong_predictors(tmp_path):
    samples = _samples()
    oracle = run_evaluation(samples, lambda batch: [Prediction(" ".join(s.references), 5) for s in batch], 3, False)
    wrong = run_evaluation(samples, lambda batch: [Prediction("no idea", 5) for _ in batch], 3, False)
    half = run_evaluation(samples, lambda batch: [Prediction(s.references[0] if s.index % 2 else "", 5)
                                                  for s in batch], 3, False)
    good = write_results(tmp_path / "good", oracle, {"label": "oracle"})
    bad = write_results(tmp_path / "bad", wrong, {"label": "wrong"})
    partial = write_results(tmp_path / "half", half, {"label": "half"})
    for task in ("niah_single_noise", "vt"):
        for length in ("800", "1600"):
            assert good["results"][task][length]["score"] == 100 and bad["results"][task][length]["score"] == 0
            assert good["results"][task][length]["samples"] == 4
            low, high = partial["results"][task][length]["ci95"]
            assert low <= partial["results"][task][length]["score"] <= high
    # niah: one reference, half the samples right; vt: 1 of its 5 names in half the samples.
    assert partial["results"]["niah_single_noise"]["800"]["score"] == 50
    assert partial["results"]["vt"]["800"]["score"] == pytest.approx(10)
    lines = (tmp_path / "good" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == len(samples) and json.loads(lines[0])["score"] == 1.0
    table = comparison_table(good, bad, ("oracle", "wrong"))
    assert "| vt | 1600 | 100.0 [100.0, 100.0] | 0.0 [0.0, 0.0] | +100.0 |" in table
    plot_results(tmp_path / "compare.png", [("oracle", good), ("wrong", bad)])
    assert (tmp_path / "compare.png").stat().st_size > 1000


def _eval(model_flags, out, extra=()):
    argv = ["eval", *model_flags, "--tasks", "niah_single_noise,babilong_qa1", "--lengths", "96,160", "--samples", "2",
            "--output-dir", str(out), "--micro-batch-size", "2", *extra]
    assert cli_main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    # The tiny tokenizer knows few of the model's ids, so the token ids are compared, not only the text.
    predictions = [(row["prediction"], row["output_ids"]) for row in
                   map(json.loads, (out / "predictions.jsonl").read_text().splitlines())]
    return results, predictions


def test_hf_directory_and_megatron_checkpoint_score_the_same(single_rank, tmp_path):
    from megatron_focusft.runtime import release_model_parallel
    from tests.convert.test_import_export import _import
    from tests.helpers.hf_models import save_tiny_hf_model

    save_tiny_hf_model("llama", tmp_path / "hf")
    _import(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    release_model_parallel()
    hf_results, hf_predictions = _eval(["--hf-path", str(tmp_path / "hf")], tmp_path / "hf-eval")
    mc_results, mc_predictions = _eval(["--load", str(tmp_path / "ckpt")], tmp_path / "mc-eval",
                                       ("--compare", str(tmp_path / "hf-eval" / "results.json")))
    assert hf_predictions == mc_predictions and all(ids for _, ids in hf_predictions)
    assert hf_results["results"] == mc_results["results"]
    for task in ("niah_single_noise", "babilong_qa1"):
        assert set(hf_results["results"][task]) == {"96", "160"}
        assert 0 < hf_results["results"][task]["160"]["mean_prompt_tokens"] <= 160 + 10  # + the chat template
    assert (tmp_path / "mc-eval" / "compare.md").is_file() and (tmp_path / "mc-eval" / "scores.png").is_file()
    # The other modes run through the same harness: a bidirectional prefill with adapted fast weights.
    tta, tta_predictions = _eval(["--load", str(tmp_path / "ckpt"), "--prefill", "focusft", "--test-time-adaptation",
                                  "--focusft-rank", "4"], tmp_path / "tta-eval")
    assert tta["meta"]["test_time_adaptation"] and tta["meta"]["prefill"] == "focusft"
    assert tta_predictions != mc_predictions


def test_eval_usage_errors(capsys):
    for argv, message in ((["--load", "x", "--tasks", "niah"], "unknown task(s) ['niah']"),
                          (["--load", "x", "--lengths", "0"], "expected positive integers"),
                          (["--load", "x", "--babilong-file", "qa1:x:y"], "expected TASK:LENGTH:PATH"),
                          (["--load", "x", "--ruler-file", "absent.jsonl"], "absent.jsonl does not exist")):
        with pytest.raises(SystemExit) as exc:
            cli_main(["eval", *argv, "--output-dir", "out"])
        assert exc.value.code == 2 and message in capsys.readouterr().err
