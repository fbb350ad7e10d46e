"""The SFT-vs-FocuSFT demo (megatron_focusft.demo): data generator, evaluation, and the CI-sized run end to end."""

from __future__ import annotations

import json
import math
import random
import struct

import pytest
import torch

from megatron_focusft import demo
from megatron_focusft.cli import main as cli_main
from megatron_focusft.data.tokenizer import ByteChatTokenizer, flatten_segments

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOK = ByteChatTokenizer()
ASSISTANT_ID = ByteChatTokenizer.ROLE_IDS["assistant"]


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_symbols", [1, 3, len(demo.SYMBOLS)])
@pytest.mark.parametrize("length", [None, 300, 1024])
def test_chat_has_exact_length_and_its_answer_follows_from_the_context(num_symbols, length):
    task = demo.DemoTaskConfig(num_symbols=num_symbols)
    length = length or task.min_length()
    rng = random.Random(0)
    for _ in range(5):
        chat = demo.make_chat(task, length, rng)
        ids, response = flatten_segments(TOK.render_chat(chat["messages"]))
        assert len(ids) == length
        system, user, assistant = chat["messages"]
        assert [m["role"] for m in chat["messages"]] == ["system", "user", "assistant"]
        document = system["content"]
        assert set(document) <= set(" abcdefghijklmnopqrstuvwxyz" + demo.SYMBOLS)
        present = [c for c in document if c in demo.SYMBOLS]
        assert len(present) == len(set(present)) == num_symbols
        assert user["content"] == "?"
        assert assistant["content"] == chat["answer"] == "".join(sorted(present))
        # The one scored span is the answer; the response run ends with the end-of-turn token.
        (start, end), = demo.answer_spans(torch.tensor(response))
        assert TOK.decode(ids[start:end]) == chat["answer"] and ids[end] == TOK.END_ID
        assert ids[start - 1] == ASSISTANT_ID and sum(response) == num_symbols + 1


def test_haystack_spreads_the_symbols():
    rng = random.Random(0)
    positions = []
    for _ in range(40):
        document = demo.make_chat(demo.DemoTaskConfig(num_symbols=3), 1000, rng)["messages"][0]["content"]
        positions += [i / len(document) for i, c in enumerate(document) if c in demo.SYMBOLS]
    assert min(positions) < 0.1 and max(positions) > 0.9  # anywhere in the haystack


def test_chat_rejects_a_length_below_the_minimum():
    task = demo.DemoTaskConfig(num_symbols=4)
    with pytest.raises(ValueError, match="without filler"):
        demo.make_chat(task, task.min_length() - 1, random.Random(0))


def test_training_lengths_cover_every_step_and_spread_over_octaves():
    config = demo.DemoConfig(steps=50)
    lengths = demo.training_lengths(config, random.Random(0))
    assert min(lengths) >= config.task.min_length() and max(lengths) <= config.seq_length
    need = config.steps * config.micro_batch_size * config.seq_length
    assert 1.25 * need <= sum(lengths) < 1.25 * need + 256 * config.seq_length
    # Density 1/L^2: each octave holds about the same share of the tokens.
    top_octave = sum(n for n in lengths if n > config.seq_length // 2) / sum(lengths)
    octaves = math.log2(config.seq_length / config.task.min_length())
    assert 0.5 / octaves < top_octave < 2 / octaves
    with pytest.raises(ValueError):
        demo.sample_lengths(3, 10, 5, random.Random(0))


def test_context_free_loss():
    assert demo.DemoTaskConfig(num_symbols=1).context_free_loss() == pytest.approx(math.log(len(demo.SYMBOLS)) / 2)
    assert demo.DemoTaskConfig(num_symbols=2).context_free_loss() == pytest.approx(math.log(19 * 18 / 2) / 3)
    assert demo.DemoTaskConfig(num_symbols=len(demo.SYMBOLS)).context_free_loss() == 0.0


def test_context_free_guess_is_the_successor_rule():
    ids = [ByteChatTokenizer.FIRST_BYTE_ID + ord(c) for c in demo.SYMBOLS]
    assert demo.context_free_guess([]) == ids[0]
    assert demo.context_free_guess([ids[0], ids[3]]) == ids[4]
    assert demo.context_free_guess([ids[-1]]) == ids[-1]


def test_inner_objectives_match_the_focusft_package():
    from megatron_focusft.focusft import INNER_OBJECTIVES

    assert demo.INNER_OBJECTIVES == INNER_OBJECTIVES


# ---------------------------------------------------------------------------------------------
# Evaluation against an independent count
# ---------------------------------------------------------------------------------------------


class _Oracle(torch.nn.Module):
    """Logits [b, s, vocab] whose argmax at t is a wrong token everywhere except where t predicts an
    answer symbol: there it is the symbol, unless `wrong` (a set of (first token of the row's
    answer, symbol index)) marks it. Answers are found from the <assistant> token, not from the
    response flags the evaluation uses."""

    def __init__(self, wrong: set[tuple[int, int]], num_symbols: int) -> None:
        super().__init__()
        self.wrong, self.k = wrong, num_symbols

    def forward(self, tokens, position_ids, attention):
        b, s = tokens.shape
        target = torch.full((b, s), TOK.FIRST_BYTE_ID + ord("z"))  # never a symbol
        for row in range(b):
            at = tokens[row].tolist().index(ASSISTANT_ID)  # the logit at `at + j` predicts symbol j
            for j in range(self.k):
                right = int(tokens[row, at + 1 + j])
                target[row, at + j] = right + 1 if (int(tokens[row, at + 1]), j) in self.wrong else right
        return torch.nn.functional.one_hot(target, TOK.vocab_size).float() * 5.0


class _Uniform(torch.nn.Module):
    def forward(self, tokens, position_ids, attention):
        return torch.zeros(*tokens.shape, TOK.vocab_size)


def _eval_set(tmp_path, task, length=96, count=12):
    path = demo.write_chats(tmp_path / "eval.jsonl", task, [length] * count, seed=3)
    chats = [json.loads(line) for line in path.read_text().splitlines()]
    return demo.load_eval_samples(path, length), chats


@pytest.mark.parametrize("rows_per_batch", [1, 5])
def test_accuracy_equals_an_independent_count(tmp_path, rows_per_batch):
    task = demo.DemoTaskConfig(num_symbols=3)
    samples, chats = _eval_set(tmp_path, task)
    first = [TOK.FIRST_BYTE_ID + ord(c["answer"][0]) for c in chats]
    distinct = sorted(set(first))
    assert len(distinct) >= 4
    # Answers starting with an even-ranked symbol get one wrong token; one odd-ranked gets two.
    wrong = {(f, i % 3) for i, f in enumerate(distinct) if i % 2 == 0} | {(distinct[1], 1), (distinct[1], 2)}
    # Independent count in character space.
    marks = [[(f, j) in wrong for j in range(3)] for f in first]
    expected_exact = sum(not any(m) for m in marks) / len(chats)
    expected_tokens = sum(3 - sum(m) for m in marks) / (3 * len(chats))
    assert 0 < expected_exact < 1
    result = demo.evaluate(_Oracle(wrong, 3), samples, rows_per_batch=rows_per_batch)
    assert result["answers"] == len(chats)
    assert result["accuracy"] == pytest.approx(expected_exact)
    assert result["token_accuracy"] == pytest.approx(expected_tokens)
    perfect = demo.evaluate(_Oracle(set(), 3), samples, rows_per_batch=rows_per_batch)
    assert perfect["accuracy"] == perfect["token_accuracy"] == 1.0


def _baseline_by_hand(answer: str) -> list[bool]:
    guesses = [demo.SYMBOLS[0]] + [demo.SYMBOLS[min(demo.SYMBOLS.index(c) + 1, len(demo.SYMBOLS) - 1)]
                                   for c in answer[:-1]]
    return [g == c for g, c in zip(guesses, answer)]


def test_uniform_model_has_loss_log_vocab_and_the_baseline_is_counted_by_hand(tmp_path):
    task = demo.DemoTaskConfig(num_symbols=1)  # the baseline is right when the symbol is "!"
    samples, chats = _eval_set(tmp_path, task, count=40)
    result = demo.evaluate(_Uniform(), samples, rows_per_batch=7)
    assert result["response_loss"] == pytest.approx(math.log(TOK.vocab_size), rel=1e-6)
    assert result["accuracy"] == 0.0  # argmax of equal logits is id 0 (padding), never a symbol
    hand = [_baseline_by_hand(c["answer"]) for c in chats]
    assert 0 < sum(map(all, hand)) < len(chats)
    assert result["baseline_accuracy"] == pytest.approx(sum(map(all, hand)) / len(chats))


def test_evaluate_refuses_samples_without_an_answer():
    class NoAnswers:
        def __len__(self):
            return 1

        def sample(self, i):
            return torch.arange(8, 16), torch.zeros(8, dtype=torch.uint8)

    with pytest.raises(ValueError, match="no answer"):
        demo.evaluate(_Uniform(), NoAnswers())


# ---------------------------------------------------------------------------------------------
# Configuration and command line
# ---------------------------------------------------------------------------------------------


def test_config_validation_and_cli_flags():
    with pytest.raises(ValueError, match="num_symbols"):
        demo.DemoTaskConfig(num_symbols=0)
    with pytest.raises(ValueError, match="too short"):
        demo.DemoConfig(seq_length=8)
    with pytest.raises(ValueError, match="inner_objective"):
        demo.DemoConfig(focusft_inner_objective="both")
    args = demo.build_parser().parse_args(["--short", "--steps", "3", "--output-dir", "x", "--seed", "7"])
    config = demo.config_from_args(args)
    assert (config.steps, config.output_dir, config.seed) == (3, "x", 7)
    assert config.seq_length == demo.DemoConfig.short().seq_length
    args = demo.build_parser().parse_args(["--focusft-inner-objective", "context"])
    argv = demo.training_argv(demo.config_from_args(args), "focusft", "d.jsonl", "tb", "cache")
    assert "--focusft-inner-objective context" in " ".join(argv)
    default = demo.config_from_args(demo.build_parser().parse_args([]))
    assert default == demo.DemoConfig()
    assert default.eval_lengths == tuple(default.seq_length * m for m in (1, 2, 4))


def test_focusft_demo_command_rejects_bad_settings_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["demo", "--steps", "0", "--output-dir", str(tmp_path / "never")])
    assert exc.value.code == 2 and "steps must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------------------------------------
# The CI-sized demo, end to end
# ---------------------------------------------------------------------------------------------


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG file"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _finite_numbers(value, where: str):
    if isinstance(value, dict):
        for k, v in value.items():
            _finite_numbers(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _finite_numbers(v, f"{where}[{i}]")
    elif isinstance(value, float):
        assert math.isfinite(value), f"{where} is {value}"


@pytest.mark.timeout(300)
def test_short_demo_writes_results_plots_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = demo.DemoConfig.short(output_dir=str(tmp_path / "demo"))
    results = demo.run_demo(config, command="focusft demo --short", log=lambda line: None)
    out = tmp_path / "demo"
    saved = json.loads((out / "results.json").read_text())
    _finite_numbers(saved, "results")
    assert saved["step_time_ratio"] == pytest.approx(results["step_time_ratio"])

    for key in ("sft_accuracy", "focusft_accuracy", "sink_mass_sft", "sink_mass_focusft",
                "engagement_sft", "engagement_focusft", "step_time_ratio"):
        assert isinstance(saved[key], float), key
    lengths = [str(n) for n in config.eval_lengths]
    assert lengths == ["128", "256", "512"]
    for run in ("sft", "focusft"):
        record = saved["runs"][run]
        for what in ("accuracy", "token_accuracy", "response_loss"):
            assert list(saved[f"{run}_{what}_by_length"]) == lengths
        assert saved[f"{run}_accuracy"] == saved[f"{run}_accuracy_by_length"]["128"]
        for n in lengths:
            ev = record["eval"][n]
            assert ev["answers"] == config.eval_samples
            assert 0.0 <= ev["accuracy"] <= ev["token_accuracy"] <= 1.0
            assert ev["response_loss"] > 0
            assert 0.0 <= ev["sink_mass"] <= ev["sink_mass_first4"] <= 1.0
            assert 0.0 <= ev["context_engagement"] <= 1.0
            assert ev["sink_mass_first4"] + ev["context_engagement"] <= 1.0 + 1e-6
        assert saved[f"sink_mass_{run}"] == record["eval"]["128"]["sink_mass"]
        assert saved[f"engagement_{run}"] == record["eval"]["128"]["context_engagement"]
        assert len(record["loss"]) == len(record["seconds_per_step"]) == config.steps
        assert [p["iteration"] for p in record["attention_metrics_during_training"]] == [3, 6]
        assert f"--training-mode {run}" in record["command"] and "--sft-mask focusft" in saved["commands"]["sft"]
    assert len(saved["runs"]["focusft"]["inner_loss_before"]) == config.steps
    # The step-time ratio is the ratio of the median step times, the first step excluded.
    steady = {r: sorted(saved["runs"][r]["seconds_per_step"][1:]) for r in ("sft", "focusft")}
    assert [len(v) for v in steady.values()] == [5, 5]
    assert saved["step_time_ratio"] > 0
    assert saved["step_time_ratio"] == pytest.approx(steady["focusft"][2] / steady["sft"][2])
    # The context-free guess, recounted by hand from the written evaluation data.
    for n in lengths:
        chats = [json.loads(line) for line in (out / "data" / f"eval_{n}.jsonl").read_text().splitlines()]
        hand = [_baseline_by_hand(c["answer"]) for c in chats]
        assert saved["baseline_accuracy_by_length"][n] == pytest.approx(sum(map(all, hand)) / len(chats))
        assert saved["baseline_token_accuracy_by_length"][n] == pytest.approx(
            sum(map(sum, hand)) / sum(map(len, hand)))
    assert saved["commands"]["demo"] == "focusft demo --short"
    assert saved["config"]["steps"] == config.steps

    assert sorted(saved["plots"]) == sorted(str(out / name) for name in
                                            ("loss_curves.png", "attention_metrics.png", "accuracy_by_length.png"))
    for path in saved["plots"]:
        width, height = _png_size(out / path.rsplit("/", 1)[1])
        assert width >= 600 and height >= 300
    for run in ("sft", "focusft"):
        events = EventAccumulator(str(out / "tensorboard" / run))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"train/loss", "train/learning_rate", "attention/sink_mass", "attention/context_engagement"} <= tags
        assert [e.step for e in events.Scalars("train/loss")] == list(range(1, config.steps + 1))
        assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(saved["runs"][run]["loss"])
        assert ("train/inner_loss_before" in tags) == (run == "focusft")
