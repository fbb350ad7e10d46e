"""``focusft segment``: synthetic -> train -> apply -> eval end to end, token offsets with a Hugging
Face tokenizer, the bench's table, and bad input as usage errors that name the row."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from megatron_focusft.cli import main
from megatron_focusft.segment.corpus import read_documents


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_synthetic_train_apply_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    gold, model, pred = tmp_path / "gold.jsonl", tmp_path / "model", tmp_path / "pred.jsonl"
    assert main(["segment", "synthetic", "--output", str(gold), "--documents", "12", "--seed", "1"]) == 0
    assert main(["segment", "train", "--train", str(gold), "--output", str(model), "--epochs", "1",
                 "--no-progress"]) == 0
    assert (model / "config.json").exists() and (model / "model.pt").exists()
    assert main(["segment", "apply", "--method", "learned", "--model", str(model), "--level", "2",
                 "--max-block-tokens", "300", "--input", str(gold), "--output", str(pred)]) == 0
    rows = _rows(pred)
    assert len(rows) == 12 and "levels" not in rows[0] and rows[0]["segmenter"].startswith("learned(")
    assert [r["text"] for r in rows] == [d.text for d in read_documents(gold)]
    assert "token_boundaries" not in rows[0]  # only with --tokenizer
    capsys.readouterr()
    assert main(["segment", "eval", "--gold", str(gold), "--pred", str(pred), "--level", "2", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["documents"] == 12 and 0.0 <= scores["f1"] <= 1.0 and 0.0 <= scores["pk"] <= 1.0
    # Gold against itself is perfect.
    assert main(["segment", "eval", "--gold", str(gold), "--pred", str(gold), "--json"]) == 0
    perfect = json.loads(capsys.readouterr().out)
    assert perfect["f1"] == 1.0 and perfect["pk"] == 0.0 and perfect["windowdiff"] == 0.0


def test_apply_with_a_hugging_face_tokenizer_writes_token_offsets(tmp_path: Path):
    pytest.importorskip("transformers", reason="transformers is not installed")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = "one two three four five six seven eight"
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator([words], trainer=trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(tmp_path / "tok")
    data, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    data.write_text(json.dumps({"text": words, "id": "a"}) + "\n")
    assert main(["segment", "apply", "--method", "fixed", "--max-block-tokens", "3", "--tokenizer",
                 str(tmp_path / "tok"), "--input", str(data), "--output", str(out)]) == 0
    (row,) = _rows(out)
    assert row["id"] == "a" and row["token_boundaries"] == [3, 6]
    assert row["boundaries"] == [words.index("four"), words.index("seven")]  # 3 words per block


@pytest.mark.parametrize(("rows", "flags", "message"), [
    ([{"text": "fine"}, {"text": ""}], ["--method", "delimiter"], r"in\.jsonl, row 2: empty text"),
    ([{"text": "fine"}], ["--method", "fixed", "--max-block-tokens", "0"], "at least one token"),
    ([{"text": "fine"}], ["--method", "delimiter", "--threshold", "0.5"], "does not take threshold"),
    ([{"text": "fine"}], ["--method", "learned", "--model", "/nonexistent"], "no config.json"),
])
def test_apply_bad_input_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], rows, flags, message):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit) as exc:
        main(["segment", "apply", *flags, "--input", str(data), "--output", str(tmp_path / "out.jsonl")])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out.jsonl").exists()


def test_eval_names_bad_gold_rows_and_mismatched_texts(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    gold, pred = tmp_path / "gold.jsonl", tmp_path / "pred.jsonl"
    gold.write_text(json.dumps({"text": "abc", "boundaries": [1]}) + "\n" +
                    json.dumps({"text": "abcd", "boundaries": [9]}) + "\n")
    pred.write_text(json.dumps({"text": "abc", "boundaries": []}) + "\n" +
                    json.dumps({"text": "abcx", "boundaries": []}) + "\n")
    with pytest.raises(SystemExit):
        main(["segment", "eval", "--gold", str(gold), "--pred", str(pred)])
    assert f"{gold}, row 2: boundary 9 is outside the text" in capsys.readouterr().err
    gold.write_text(json.dumps({"text": "abc", "boundaries": [1]}) + "\n" +
                    json.dumps({"text": "abcd", "boundaries": [2]}) + "\n")
    with pytest.raises(SystemExit):
        main(["segment", "eval", "--gold", str(gold), "--pred", str(pred)])
    assert f"{pred}, row 2: its text differs from row 2 of the gold file" in capsys.readouterr().err


def test_bench_prints_the_table(capsys: pytest.CaptureFixture[str]):
    assert main(["segment", "bench", "--train-documents", "8", "--test-documents", "4", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| granularity | method | setting | F1 | F1 (w=16) | Pk | WindowDiff | blocks / text |")
    lines = [line for line in out.splitlines() if line.startswith(("| coarse", "| fine"))]
    assert len(lines) == 10 and sum("| learned |" in line for line in lines) == 2


def test_apply_join_blocks_resegments_block_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    blocks = ["First passage here.\nIt goes on.", "Second passage.", "Third one."]
    data, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    data.write_text(json.dumps({"blocks": blocks, "messages": [{"role": "user", "content": "q"}],
                                "meta": {"index": 3, "answer_block": 1}}) + "\n")
    # Joined by a blank line, the reference's delimiter split gives the passages back.
    assert main(["segment", "apply", "--method", "delimiter", "--join-blocks", "\n\n", "--input", str(data),
                 "--output", str(out)]) == 0
    (row,) = _rows(out)
    assert row["blocks"] == blocks and row["meta"] == {"index": 3} and row["messages"][0]["content"] == "q"
    joined = "\n\n".join(blocks)
    assert row["boundaries"] == [joined.index("Second"), joined.index("Third")]
    # Joined by a space there is no delimiter left but the newline inside the first passage.
    assert main(["segment", "apply", "--method", "delimiter", "--join-blocks", " ", "--input", str(data),
                 "--output", str(out)]) == 0
    assert _rows(out)[0]["blocks"] == ["First passage here.", "It goes on. Second passage. Third one."]
    data.write_text(json.dumps({"text": "no blocks here"}) + "\n")
    with pytest.raises(SystemExit):
        main(["segment", "apply", "--method", "delimiter", "--join-blocks", " ", "--input", str(data),
              "--output", str(out)])
    assert "row 1: --join-blocks needs 'blocks'" in capsys.readouterr().err
