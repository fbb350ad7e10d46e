"""Chat tokenizers: a conversation becomes token ids plus a response flag per token.

A tokenizer renders ``messages`` (and optional ``tools``) to a list of segments
``(token_ids, is_response)``. Response tokens are the assistant's content and its end-of-turn
token; everything else (system prompt, user turns, tool outputs, tool definitions and the
assistant header) is context. The FocuSFT blocks and the loss mask follow these flags.

Two implementations:

- ``ByteChatTokenizer``: built in, needs no files. UTF-8 bytes plus a few special tokens and
  a fixed chat format; it is the tokenizer of the embedded default model.
- ``HFChatTokenizer``: a Hugging Face fast tokenizer from a local directory and its chat
  template. The response flags come from the template's ``{% generation %}`` blocks when it has
  them, else from rendering prefixes of the conversation (see ``HFChatTokenizer``).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

Message = Mapping[str, Any]
# One run of tokens with the same flag: (token ids, True on response tokens).
ChatSegment = tuple[list[int], bool]
AssistantMaskMethod = Literal["auto", "generation", "prefix"]


class ChatTemplateError(ValueError):
    """The chat template cannot render this conversation, or cannot be split into turns."""


@runtime_checkable
class ChatTokenizer(Protocol):
    """What the chat data pipeline needs from a tokenizer.

    identity     a string that changes whenever the token ids of any conversation could change
                 (vocabulary, template, options); it keys the tokenised-data cache.
    vocab_size   ids are in [0, vocab_size).
    pad_id       id written at padding positions (never scored, never attended).
    eos_id       end of a turn / of generation, or None.
    bos_id       start of a sequence, or None.
    """

    identity: str
    vocab_size: int
    pad_id: int
    eos_id: int | None
    bos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def render_chat(self, messages: Sequence[Message], tools: Sequence[Any] | None = None) -> list[ChatSegment]: ...

    def render_prompt(self, messages: Sequence[Message], tools: Sequence[Any] | None = None) -> list[ChatSegment]:
        """`render_chat` of the conversation followed by the assistant header (context): the
        prompt a model continues with its reply."""
        ...

    def encode_prompt(self, text: str) -> list[int]:
        """A raw text prompt as the model saw text in pretraining (with BOS where the tokenizer adds one)."""
        ...


def segments_from_flags(ids: Sequence[int], flags: Sequence[bool | int]) -> list[ChatSegment]:
    """Group per-token ids and flags into maximal runs of equal flag."""
    if len(ids) != len(flags):
        raise ValueError(f"{len(ids)} token ids but {len(flags)} flags")
    segments: list[ChatSegment] = []
    pos = 0
    for flag, run in itertools.groupby(bool(f) for f in flags):
        n = sum(1 for _ in run)
        segments.append((list(ids[pos:pos + n]), flag))
        pos += n
    return segments


def flatten_segments(segments: Sequence[ChatSegment]) -> tuple[list[int], list[int]]:
    """(token ids, response flags 0/1) of a rendered conversation."""
    ids: list[int] = []
    response: list[int] = []
    for seg_ids, is_response in segments:
        ids.extend(seg_ids)
        response.extend([int(is_response)] * len(seg_ids))
    return ids, response


# ---------------------------------------------------------------------------------------------
# Built-in byte tokenizer
# ---------------------------------------------------------------------------------------------


class ByteChatTokenizer:
    """UTF-8 bytes plus special tokens; a fixed chat format, no files.

    Ids: 0 pad, 1 bos, 2 end (end of turn, also eos), 3-6 the role headers system, user,
    assistant, tool, 7 the tool-definitions header; byte b is id ``FIRST_BYTE_ID + b``.
    Text never produces a special id, so no message can forge a turn boundary.

    Format (``|`` separates context from response, which is the assistant content plus end)::

        bos [tools json(tools) end] (role content end)* ...
        assistant | content [json(tool_calls)] end |

    An assistant message with ``tool_calls`` appends them as JSON after its content (one
    newline between when the content is not empty). Other keys of a message are not rendered.
    """

    PAD_ID, BOS_ID, END_ID = 0, 1, 2
    ROLE_IDS: Mapping[str, int] = {"system": 3, "user": 4, "assistant": 5, "tool": 6}
    TOOLS_ID = 7
    FIRST_BYTE_ID = 8
    SPECIAL_NAMES = ("<pad>", "<bos>", "<end>", "<system>", "<user>", "<assistant>", "<tool>", "<tools>")

    identity = "byte-chat-v1"
    vocab_size = FIRST_BYTE_ID + 256
    pad_id = PAD_ID
    eos_id = END_ID
    bos_id = BOS_ID

    def encode(self, text: str) -> list[int]:
        return [self.FIRST_BYTE_ID + b for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens written as their names (for reading, not round trips)."""
        out: list[str] = []
        for is_byte, run in itertools.groupby(ids, key=lambda i: i >= self.FIRST_BYTE_ID):
            if is_byte:
                out.append(bytes(i - self.FIRST_BYTE_ID for i in run).decode("utf-8", errors="replace"))
            else:
                out.extend(self.SPECIAL_NAMES[i] for i in run)
        return "".join(out)

    def render_chat(self, messages: Sequence[Message], tools: Sequence[Any] | None = None) -> list[ChatSegment]:
        context: list[int] = [self.BOS_ID]
        segments: list[ChatSegment] = []
        if tools:
            context += [self.TOOLS_ID, *self.encode(json.dumps(list(tools), ensure_ascii=False)), self.END_ID]
        for index, message in enumerate(messages, start=1):
            role = message.get("role")
            if role not in self.ROLE_IDS:
                raise ChatTemplateError(f"message {index} has role {role!r}; the byte chat format knows "
                                        f"{', '.join(self.ROLE_IDS)}")
            text = message.get("content") or ""
            if not isinstance(text, str):
                raise ChatTemplateError(f"message {index} content must be a string, got {type(text).__name__}")
            context.append(self.ROLE_IDS[role])
            if role != "assistant":
                context += [*self.encode(text), self.END_ID]
                continue
            if message.get("tool_calls"):
                calls = json.dumps(message["tool_calls"], ensure_ascii=False)
                text = f"{text}\n{calls}" if text else calls
            segments.append((context, False))
            segments.append(([*self.encode(text), self.END_ID], True))
            context = []
        if context:
            segments.append((context, False))
        return segments

    def render_prompt(self, messages: Sequence[Message], tools: Sequence[Any] | None = None) -> list[ChatSegment]:
        return [*self.render_chat(messages, tools), ([self.ROLE_IDS["assistant"]], False)]

    def encode_prompt(self, text: str) -> list[int]:
        return [self.BOS_ID, *self.encode(text)]


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizer + chat template
# ---------------------------------------------------------------------------------------------

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class HFChatTokenizer:
    """A Hugging Face fast tokenizer loaded from a local directory, with its chat template.

    path            directory with tokenizer.json / tokenizer_config.json (no download).
    chat_template   replaces the tokenizer's template when given.
    template_kwargs extra variables for the template (e.g. ``{"enable_thinking": False}``).
    assistant_mask  how response tokens are found:
        "generation": the template's ``{% generation %}`` blocks (``apply_chat_template(...,
                      return_assistant_tokens_mask=True)``); the template decides what is
                      inside, normally the content and the end-of-turn token.
        "prefix":     for assistant message i, the text from the end of ``messages[:i]`` rendered
                      with the generation prompt (so the assistant header is context) to the end
                      of ``messages[:i + 1]`` rendered, minus trailing whitespace, is the
                      response. The whole conversation is tokenised once and a token is a
                      response token when its characters overlap that span, so the ids are
                      exactly those of ``apply_chat_template``. A template that rewrites earlier
                      turns once later ones exist (prefixes that are not prefixes) raises
                      ChatTemplateError for that sample.
        "auto":       "generation" when the template has ``{% generation %}``, else "prefix".
    """

    def __init__(self, path: str | os.PathLike[str], *, chat_template: str | None = None,
                 template_kwargs: Mapping[str, Any] | None = None,
                 assistant_mask: AssistantMaskMethod = "auto") -> None:
        from transformers import AutoTokenizer

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer directory {path!r} does not exist (a local directory is required; "
                                    f"nothing is downloaded)")
        if assistant_mask not in ("auto", "generation", "prefix"):
            raise ValueError(f"assistant_mask must be auto, generation or prefix, got {assistant_mask!r}")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"{path}: a fast tokenizer (tokenizer.json) is required: the response flags need "
                             f"character offsets")
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        template = tokenizer.chat_template
        if not template:
            raise ValueError(f"{path}: the tokenizer has no chat template; pass chat_template=")
        templates = list(template.values()) if isinstance(template, Mapping) else [template]
        has_generation = any(_GENERATION_TAG.search(t) for t in templates)
        if assistant_mask == "generation" and not has_generation:
            raise ValueError(f"{path}: assistant_mask='generation' needs {{% generation %}} blocks in the chat "
                             f"template; use 'prefix' or 'auto'")
        self.path = path
        self.method: Literal["generation", "prefix"] = (
            "generation" if assistant_mask == "generation" or (assistant_mask == "auto" and has_generation)
            else "prefix")
        self.template_kwargs = dict(template_kwargs or {})
        self._tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        fingerprint = json.dumps({
            "class": type(tokenizer).__name__,
            "backend": tokenizer.backend_tokenizer.to_str(),
            "template": template,
            "template_kwargs": self.template_kwargs,
            "method": self.method,
            "special": [self.bos_id, self.eos_id, self.pad_id],
        }, sort_keys=True, default=repr)
        self.identity = f"hf-chat:{hashlib.sha256(fingerprint.encode()).hexdigest()}"

    @property
    def hf_tokenizer(self) -> Any:
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids))

    def _apply(self, messages: Sequence[Message], tools: Sequence[Any] | None, **kwargs: Any) -> Any:
        # Templates fail in many ways (jinja's raise_exception, a None concatenated, a bad role
        # order); for the pipeline each is one sample the template cannot render.
        try:
            return self._tokenizer.apply_chat_template(list(messages), tools=tools, **kwargs, **self.template_kwargs)
        except Exception as error:  # noqa: BLE001 - re-raised with the reason, per sample
            raise ChatTemplateError(f"chat template failed: {type(error).__name__}: {error}") from error

    def render_chat(self, messages: Sequence[Message], tools: Sequence[Any] | None = None) -> list[ChatSegment]:
        tools = list(tools) if tools else None
        if self.method == "generation":
            out = self._apply(messages, tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            return segments_from_flags(list(out["input_ids"]), list(out["assistant_masks"]))
        return self._render_by_prefixes(messages, tools)

    def render_prompt(self, messages: Sequence[Message], tools: Sequence[Any] | None = None) -> list[ChatSegment]:
        tools = list(tools) if tools else None
        prompt = list(self._apply(messages, tools, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
        segments = self.render_chat(messages, tools)
        rendered = [i for ids, _ in segments for i in ids]
        if prompt[:len(rendered)] != rendered:
            raise ChatTemplateError("the chat template's generation prompt does not extend the rendered conversation "
                                    "(add_generation_prompt rewrites earlier tokens)")
        header = prompt[len(rendered):]
        return [*segments, (header, False)] if header else segments

    def encode_prompt(self, text: str) -> list[int]:
        return list(self._tokenizer(text)["input_ids"])

    def _render_by_prefixes(self, messages: Sequence[Message], tools: list[Any] | None) -> list[ChatSegment]:
        full = self._apply(messages, tools, tokenize=False)
        spans: list[tuple[int, int]] = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            upto = self._apply(messages[:i + 1], tools, tokenize=False)
            if i > 0:
                header = self._apply(messages[:i], tools, tokenize=False, add_generation_prompt=True)
                start, header_ok = len(header), upto.startswith(header)
            else:
                # HF refuses to render an empty conversation: find the content in the first turn.
                content = message.get("content") or ""
                start = upto.rfind(content) if content else -1
                if start < 0:
                    raise ChatTemplateError("a conversation that opens with an assistant turn needs that turn's "
                                            "content in the rendered text, to split header from response")
                header_ok = True
            if not header_ok or not full.startswith(upto) or (spans and start < spans[-1][1]):
                raise ChatTemplateError(
                    f"chat template is not prefix-stable at message {i + 1} (rendering the conversation up to an "
                    f"assistant turn does not give a prefix of the whole; the template may rewrite earlier turns). "
                    f"Use a template with {{% generation %}} blocks")
            end = len(upto.rstrip())
            if end > start:
                spans.append((start, end))
        encoding = self._tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        starts = [start for start, _ in spans]
        flags = [_overlaps(a, b, starts, spans) for a, b in encoding["offset_mapping"]]
        return segments_from_flags(list(encoding["input_ids"]), flags)


def _overlaps(a: int, b: int, starts: Sequence[int], spans: Sequence[tuple[int, int]]) -> bool:
    """Whether the characters [a, b) of a token touch one of the sorted, disjoint `spans`.

    A zero-width token counts when it sits inside a span. A token straddling the header/content
    boundary is a response token: it carries response text.
    """
    i = bisect.bisect_right(starts, a) - 1  # the last span starting at or before a
    if i >= 0 and a < spans[i][1]:
        return True
    return i + 1 < len(spans) and spans[i + 1][0] < b


def load_chat_tokenizer(path: str | os.PathLike[str] | None, **hf_options: Any) -> ChatTokenizer:
    """The built-in ByteChatTokenizer when `path` is None, else an HFChatTokenizer of `path`."""
    if path is None:
        if hf_options:
            raise ValueError(f"options {sorted(hf_options)} apply to a Hugging Face tokenizer only")
        return ByteChatTokenizer()
    return HFChatTokenizer(path, **hf_options)
