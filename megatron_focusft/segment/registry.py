"""The segmentation methods: one registration each, the only list of them.

`build_segmenter(name, settings, tokenizer)` gives a Segmenter: ``segment(texts)`` returns, per
text, its block boundaries as character offsets (strictly increasing, in (0, len(text))), and
``identity`` is a string that changes whenever the boundaries of any text could change (method,
settings, tokenizer, model weights): a tokenised-data cache keyed by it never serves blocks of
another segmenter. The CLI (`focusft segment apply --method M`) reads the methods from here, as
the block-attention data path does (`--block-segmenter M`, blockattn/method.py): a new method
is one factory plus one `register_segmenter` call below.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from megatron_focusft.data.tokenizer import ChatTokenizer
from megatron_focusft.registry import Registry


class Segmenter(Protocol):
    identity: str

    def segment(self, texts: Sequence[str]) -> list[list[int]]: ...


@dataclass(frozen=True)
class SegmenterSettings:
    """What a caller may set; each method accepts some of the first four (None: unset).

    max_block_tokens  budget: no block has more tokens (fixed: the block length).
    threshold         cut where a candidate's score reaches it (learned: probability in (0, 1);
                      texttiling: valley depth; unset: the method's default).
    level             granularity level of a learned model (1 coarsest .. the model's levels).
    model             directory of a learned model (`focusft segment train`).
    batch_size        texts per inference batch (methods that run a model).
    progress          show a progress bar over inference batches.
    """

    max_block_tokens: int | None = None
    threshold: float | None = None
    level: int | None = None
    model: str | None = None
    batch_size: int = 64
    progress: bool = False

    def __post_init__(self) -> None:
        if self.max_block_tokens is not None and self.max_block_tokens < 1:
            raise ValueError(f"the block budget must be at least one token, got max_block_tokens="
                             f"{self.max_block_tokens}")
        if self.level is not None and self.level < 1:
            raise ValueError(f"level must be >= 1 (1 is the coarsest), got {self.level}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


TUNABLE = ("max_block_tokens", "threshold", "level", "model")
SegmenterFactory = Callable[[SegmenterSettings, ChatTokenizer], Segmenter]


@dataclass(frozen=True)
class SegmenterMethod:
    """What the rest of the package needs to know about one method.

    name      the value of --method / --block-segmenter.
    factory   "module:attribute" of ``factory(settings, tokenizer) -> Segmenter``, imported on
              first use (the learned method needs torch, the baselines do not).
    accepts   the settings of TUNABLE it reads; setting another one is an error.
    help      one line for --help.
    """

    name: str
    factory: str
    accepts: frozenset[str]
    help: str

    def unaccepted(self, settings: SegmenterSettings) -> list[str]:
        """The settings of TUNABLE that are set but that this method does not read."""
        return [f for f in TUNABLE if getattr(settings, f) is not None and f not in self.accepts]

    def build(self, settings: SegmenterSettings, tokenizer: ChatTokenizer) -> Segmenter:
        ignored = self.unaccepted(settings)
        if ignored:
            raise ValueError(f"method {self.name!r} does not take {', '.join(ignored)}; it takes "
                             f"{', '.join(sorted(self.accepts)) or 'none of ' + ', '.join(TUNABLE)}")
        module, attribute = self.factory.split(":")
        return getattr(importlib.import_module(module), attribute)(settings, tokenizer)


_METHODS: Registry[SegmenterMethod] = Registry("segmenter")


def register_segmenter(method: SegmenterMethod) -> SegmenterMethod:
    unknown = method.accepts - set(TUNABLE)
    if unknown:
        raise ValueError(f"segmenter {method.name!r} accepts unknown settings {sorted(unknown)}")
    return _METHODS.register(method.name, method)


def segmenter_method(name: str) -> SegmenterMethod:
    """The record of method `name`; ValueError lists the registered ones."""
    return _METHODS.get(name)


def segmenter_names() -> tuple[str, ...]:
    return _METHODS.names()


def build_segmenter(name: str, settings: SegmenterSettings, tokenizer: ChatTokenizer) -> Segmenter:
    return segmenter_method(name).build(settings, tokenizer)


register_segmenter(SegmenterMethod(
    "fixed", "megatron_focusft.segment.baselines:fixed_segmenter", frozenset({"max_block_tokens"}),
    help="blocks of exactly max_block_tokens tokens (the last one shorter)"))
register_segmenter(SegmenterMethod(
    "delimiter", "megatron_focusft.segment.baselines:delimiter_segmenter", frozenset(),
    help="the block-attention reference's rules: the first delimiter present, chunks merged to fewer than 15"))
register_segmenter(SegmenterMethod(
    "texttiling", "megatron_focusft.segment.baselines:texttiling_segmenter",
    frozenset({"threshold", "max_block_tokens"}),
    help="TextTiling: valleys of lexical similarity across candidate cuts, deeper than a cutoff"))
register_segmenter(SegmenterMethod(
    "learned", "megatron_focusft.segment.learned:learned_segmenter",
    frozenset({"model", "threshold", "level", "max_block_tokens"}),
    help="a trained boundary classifier over candidate cuts, threshold + recursive splitting to a budget"))
