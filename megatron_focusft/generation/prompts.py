"""Prompts in, generations out.

Input JSONL, one prompt per row, one of:
  {"messages": [...], "tools": [...]?}  a chat, rendered with the tokenizer's template plus the
                                        assistant header (earlier assistant turns are response
                                        blocks under the `focusft` prefill)
  {"input_ids": [1, 2, ...]}            raw token ids
  {"prompt": "text"}                    raw text (`--prompt` too)
With --blocks (block attention with KV reuse) a row is one of
  {"blocks": [text or ids, ...], "global": text or ids}
  {"blocks": [text or ids, ...], "messages": [...], "tools": [...]?}
local blocks (encoded alone with `tokenizer.encode`, no chat template, so a cached block's tokens
never depend on its neighbours; cached, reused at any offset) and the global block: `global` as
the model expects it (the question and the assistant header), or the rendered prompt of
`messages` (the chat template up to the assistant header; a final assistant message, the
training rows' response, is left out). Texts are encoded as they are.
Output JSONL, one row per prompt, in input order: index, prompt_tokens, output_ids, text,
finish_reason.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from megatron_focusft.data.chat import BadSample, parse_chat_row
from megatron_focusft.data.tokenizer import ChatTemplateError, ChatTokenizer, flatten_segments
from megatron_focusft.generation.blocks import BlockPrompt
from megatron_focusft.generation.decode import Generation, Prompt


class PromptError(ValueError):
    """A prompt row that cannot be used; the message names the file and line."""


def _in_vocabulary(ids: Sequence[int], vocab_size: int, where: str) -> None:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise PromptError(f"{where}: token id {bad[0]} is outside the model's vocabulary [0, {vocab_size})")


def prompt_of_row(row: Any, tokenizer: ChatTokenizer, vocab_size: int, where: str) -> Prompt:
    if not isinstance(row, dict):
        raise PromptError(f"{where}: expected a JSON object, got {type(row).__name__}")
    kinds = [key for key in ("messages", "input_ids", "prompt") if key in row]
    if len(kinds) != 1:
        raise PromptError(f"{where}: a row needs exactly one of 'messages', 'input_ids' or 'prompt', got {sorted(row)}")
    if kinds[0] == "messages":
        if not isinstance(row["messages"], list) or not row["messages"]:
            raise PromptError(f"{where}: 'messages' must be a non-empty list")
        try:
            ids, response = flatten_segments(tokenizer.render_prompt(row["messages"], row.get("tools")))
        except ChatTemplateError as e:
            raise PromptError(f"{where}: {e}") from None
        prompt = Prompt(tuple(ids), tuple(response))
    elif kinds[0] == "input_ids":
        ids = row["input_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise PromptError(f"{where}: 'input_ids' must be a non-empty list of integers")
        prompt = Prompt.of_tokens(ids)
    else:
        if not isinstance(row["prompt"], str) or not row["prompt"]:
            raise PromptError(f"{where}: 'prompt' must be a non-empty string")
        prompt = Prompt.of_tokens(tokenizer.encode_prompt(row["prompt"]))
    _in_vocabulary(prompt.token_ids, vocab_size, where)
    return prompt


def _ids(value: Any, tokenizer: ChatTokenizer, vocab_size: int, where: str) -> tuple[int, ...]:
    if isinstance(value, str) and value:
        ids = tokenizer.encode(value)
    elif isinstance(value, list) and value and all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        ids = value
    else:
        raise PromptError(f"{where}: expected a non-empty text or list of token ids")
    _in_vocabulary(ids, vocab_size, where)
    return tuple(ids)


def _rendered_prompt(row: dict, tokenizer: ChatTokenizer, vocab_size: int, where: str) -> tuple[int, ...]:
    """The prompt of a block row's `messages` (and `tools`): rendered up to the assistant header,
    a final assistant message left out."""
    try:
        messages, tools = parse_chat_row(row)
    except BadSample as e:
        raise PromptError(f"{where}: {e.detail}") from None
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise PromptError(f"{where}: 'messages' holds only the answer; the global block needs the turns before it")
    try:
        ids, _ = flatten_segments(tokenizer.render_prompt(messages, tools))
    except ChatTemplateError as e:
        raise PromptError(f"{where}: {e}") from None
    _in_vocabulary(ids, vocab_size, where)
    return tuple(ids)


def block_prompt_of_row(row: Any, tokenizer: ChatTokenizer, vocab_size: int, where: str) -> BlockPrompt:
    """A block row (module doc) as token ids; PromptError names `where` and the part at fault."""
    forms = [key for key in ("global", "messages") if key in row] if isinstance(row, dict) else []
    if len(forms) != 1:
        got = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise PromptError(f"{where}: a block row needs 'blocks' and exactly one of 'global' (the global block) or "
                          f"'messages' (a chat whose rendered prompt is the global block), got {got}")
    blocks = row.get("blocks", [])
    if not isinstance(blocks, list):
        raise PromptError(f"{where}: 'blocks' must be a list")
    local = tuple(_ids(b, tokenizer, vocab_size, f"{where} block {i + 1}") for i, b in enumerate(blocks))
    if forms[0] == "global":
        return BlockPrompt(local, _ids(row["global"], tokenizer, vocab_size, f"{where} global block"))
    return BlockPrompt(local, _rendered_prompt(row, tokenizer, vocab_size, f"{where} messages"))


def read_prompts(path: str | os.PathLike, tokenizer: ChatTokenizer, vocab_size: int,
                 blocks: bool = False) -> list[Prompt] | list[BlockPrompt]:
    """Every row of a JSONL file as a Prompt, or with `blocks` as a BlockPrompt (blank lines
    skipped); PromptError names the line."""
    parse = block_prompt_of_row if blocks else prompt_of_row
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                row = json.loads(line)
            except ValueError as e:
                raise PromptError(f"{where}: not valid JSON ({e})") from None
            prompts.append(parse(row, tokenizer, vocab_size, where))
    if not prompts:
        raise PromptError(f"{path}: no prompts")
    return prompts


def write_generations(out: IO[str], prompts: Sequence[Prompt] | Sequence[BlockPrompt], results: Sequence[Generation],
                      tokenizer: ChatTokenizer, first_index: int = 0) -> None:
    for offset, (prompt, result) in enumerate(zip(prompts, results)):
        size = len(prompt.token_ids) if isinstance(prompt, Prompt) else len(prompt.tokens())
        out.write(json.dumps({"index": first_index + offset, "prompt_tokens": size,
                              "output_ids": result.token_ids, "text": tokenizer.decode(result.token_ids),
                              "finish_reason": result.finish_reason}, ensure_ascii=False) + "\n")
    out.flush()


def stop_token_ids(tokenizer: ChatTokenizer, assets: Path) -> tuple[int, ...]:
    """The tokenizer's end-of-sequence id, plus those of generation_config.json when the model has one."""
    ids = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()
    config = assets / "generation_config.json"
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return tuple(sorted(ids))
