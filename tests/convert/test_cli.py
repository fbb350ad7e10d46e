"""`focusft convert` and `focusft generate` on the command line: usage errors before any work
(launch size, flags), bad prompt rows named by file and line."""

from __future__ import annotations

import json

import pytest

from megatron_focusft.cli import main


@pytest.mark.parametrize("argv, message", [
    (["convert", "import-hf", "--hf-path", "x", "--megatron-path", "y", "--tensor-model-parallel-size", "2"],
     "needs 2 process(es) (TP x PP), but 1 run: launch with torchrun --nproc-per-node 2"),
    (["convert", "import-hf", "--hf-path", "x", "--megatron-path", "y", "--pipeline-model-parallel-size", "0"],
     "--pipeline-model-parallel-size must be >= 1"),
    (["convert", "export-hf", "--megatron-path", "x"], "the following arguments are required: --hf-path"),
    (["generate", "--prompt", "hi"], "give exactly one of --hf-path and --load"),
    (["generate", "--load", "x"], "give --prompt TEXT (repeatable) or --input FILE.jsonl"),
    (["generate", "--load", "x", "--input", "absent.jsonl"], "--input absent.jsonl does not exist"),
    (["generate", "--load", "x", "--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["generate", "--load", "x", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["generate", "--load", "x", "--prompt", "hi", "--test-time-adaptation", "--focusft-inner-objective",
      "response"], "--test-time-adaptation runs the context objective"),
])
def test_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("row, message", [
    ("not json", r"prompts.jsonl:2: not valid JSON"),
    (json.dumps({"input_ids": [1, 999]}), r"prompts.jsonl:2: token id 999 is outside the model's vocabulary \[0, 264\)"),
    (json.dumps({"messages": [{"role": "narrator", "content": "x"}]}), r"prompts.jsonl:2: message 1 has role"),
    (json.dumps({"prompt": "a", "input_ids": [1]}), r"prompts.jsonl:2: a row needs exactly one of"),
    (json.dumps([1, 2]), r"prompts.jsonl:2: expected a JSON object"),
])
def test_bad_prompt_rows_name_the_line(tmp_path, row, message):
    from megatron_focusft.data.tokenizer import ByteChatTokenizer
    from megatron_focusft.generation.prompts import PromptError, read_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + row + "\n")
    with pytest.raises(PromptError, match=message):
        read_prompts(path, ByteChatTokenizer(), ByteChatTokenizer.vocab_size)


def test_prompt_rows_render_like_training(tmp_path):
    from megatron_focusft.data.tokenizer import ByteChatTokenizer, flatten_segments
    from megatron_focusft.generation.prompts import read_prompts

    tokenizer = ByteChatTokenizer()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "again"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n" + json.dumps({"input_ids": [1, 9, 10]}) + "\n")
    chat, raw = read_prompts(path, tokenizer, tokenizer.vocab_size)
    # The training rendering of the conversation plus a reply, cut before the reply's content.
    ids, response = flatten_segments(tokenizer.render_chat([*messages, {"role": "assistant", "content": "ok"}]))
    cut = len(ids) - len("ok") - 1  # the reply's content and its end token
    assert list(chat.token_ids) == ids[:cut] and list(chat.response) == response[:cut]
    assert sum(chat.response) == len("yo") + 1  # the earlier assistant turn is a response block
    assert raw.token_ids == (1, 9, 10) and raw.response == (0, 0, 0)
