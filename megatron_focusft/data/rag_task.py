"""An offline RAG-style task for block attention: self-contained passages, one holding the answer.

One sample is an optional instruction-header block, `passages` passages (one local block each)
and a question (the global block)::

    [header] [passage 1] ... [passage P] | user: What is the code of the amber falcon vault?
                                           assistant: 482193

Each passage states one fact, "The code of the <entity> is <value>.", at a random depth among
filler sentences; the other passages are distractors about other entities. Entities and values
are distinct within a sample (and within the pool, when samples share one), values are six
digits and digits occur nowhere else, so the answer occurs in exactly one passage and nowhere
else in the sample.

The "label" answer form states the fact as "The <entity> <code>." with a code of CODE_LENGTH
code words (CODE_WORDS), no two alike within a sample, and the reply repeats that sentence. Then
every code word occurs once in the passages and right after the entity, so the answer is a copy
a model can make one token at a time (the token after the entity's last word, then the token
after each code word): the form a model trained from scratch on this CPU learns to look up
(README, block attention Evidence).

Rows (`RagSample.row`, written by `focusft data rag`) are block rows: local blocks as texts,
each encoded alone with `tokenizer.encode`, and the conversation, whose rendered prompt (the
chat template up to the assistant header) is the global block and whose final assistant
message is the response::

    {"blocks": [header, passage, ...], "messages": [{"role": "user", "content": question},
     {"role": "assistant", "content": value}], "meta": {"index", "answer_block", "target_tokens"}}

Sizing, in tokens of `count_tokens` (the model's tokenizer on plain text; the chat template adds
its few tokens on top, as for the long-context tasks): every passage of a sample gets the same
budget B = (T - H - Gmax) // P (T the target, H the header, Gmax the largest question among the
passages that can appear: the sample's own question, or the pool's largest), and holds as many
filler sentences as fit in B. With S the most tokens one filler sentence adds (its text and the
joining space; exact for a tokenizer whose counts add up over texts, such as the byte tokenizer),
a sample of question size G has T - P * (S + 1) - (Gmax - G) < size <= T.

Seeded: sample i depends on (seed, i) alone, the pool on (seed, pool size); with a pool, every
sample draws its passages from one set of `pool_size` fixed texts, so a block KV cache gets hits.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

_ADJECTIVES = ("amber", "azure", "bronze", "cobalt", "copper", "crimson", "ebony", "emerald", "golden", "granite",
               "indigo", "ivory", "jade", "lilac", "maroon", "ochre", "onyx", "pearl", "russet", "saffron",
               "scarlet", "silver", "teal", "umber")
_ANIMALS = ("badger", "beetle", "bison", "condor", "coyote", "crane", "falcon", "ferret", "gecko", "heron", "ibis",
            "jackal", "lemur", "lynx", "magpie", "marmot", "moose", "newt", "osprey", "otter", "owl", "panda",
            "pelican", "puffin", "raven", "salmon", "stork", "tapir", "toad", "walrus", "weasel", "yak")
_CONTAINERS = ("vault", "locker", "safe", "chest", "cabinet", "archive", "strongbox", "depot")
ENTITIES: tuple[str, ...] = tuple(f"{a} {b} {c}" for a in _ADJECTIVES for b in _ANIMALS for c in _CONTAINERS)

_SUBJECTS = ("The porter", "A clerk", "The night guard", "An old courier", "The inspector", "A visitor",
             "The caretaker", "Our auditor", "The locksmith", "A cleaner", "The manager", "A surveyor")
_VERBS = ("checked", "polished", "counted", "sealed", "repainted", "inspected", "swept", "catalogued", "weighed",
          "relabelled", "measured", "photographed")
_OBJECTS = ("the brass hinges", "every shelf twice", "the dusty ledgers", "the front door", "a row of crates",
            "the heavy lid", "the spare keys", "the iron frame", "the visitor book", "the back stairs",
            "the alarm panel", "the floor tiles")
# Filler: no digits (they belong to the answers) and no entity names.
FILLER_SENTENCES: tuple[str, ...] = tuple(f"{s} {v} {o}." for s in _SUBJECTS for v in _VERBS for o in _OBJECTS)

# Code words of the "label" form: none is a word of the entities or the filler.
CODE_WORDS: tuple[str, ...] = (
    "alfa", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett", "kilo", "lima",
    "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey",
    "xray", "yankee", "zulu", "alpha", "beta", "gamma", "epsilon", "zeta", "theta", "iota", "kappa", "lambda",
    "omicron", "rho", "sigma", "tau", "upsilon", "phi", "chi", "psi", "omega", "nu", "xi", "mu", "pi", "eta")
CODE_LENGTH = 4

HEADER = ("Each passage below is about one place where things are kept and the code that opens it. "
          "Answer the question with the code alone.")


def _fact(entity: str, value: str, answer_form: str) -> str:
    if answer_form == "label":
        return f"The {entity} {value}."
    return f"The code of the {entity} is {value}."


def _question(entity: str) -> str:
    return f"What is the code of the {entity}?"


ANSWER_FORMS = ("code", "sentence", "label")


def _turns(entity: str, value: str, answer_form: str) -> tuple[str, str]:
    """(question, answer): the code alone, or the passage's whole fact sentence repeated (asked
    for as such, or, in the label form, asked for the code)."""
    if answer_form == "code":
        return _question(entity), value
    if answer_form == "label":
        return _question(entity), _fact(entity, value, answer_form)
    return f"Repeat the sentence about the {entity}.", _fact(entity, value, answer_form)


def vocabulary_texts() -> list[str]:
    """Texts holding every word any sample of the task can contain, opening a text, after a space
    and alone (for `focusft data tokenizer`, whose words keep the space before them)."""
    words = " ".join([*_ADJECTIVES, *_ANIMALS, *_CONTAINERS])
    texts = [HEADER, *FILLER_SENTENCES, *(_fact(words, "0123456789", form) for form in ANSWER_FORMS),
             " ".join(CODE_WORDS), *(_turns(words, "0", form)[0] for form in ANSWER_FORMS)]
    alone = sorted({word for text in texts for word in text.split()})
    return [*texts, *(" " + text for text in texts), *alone]


@dataclass(frozen=True)
class RagTaskConfig:
    """num_samples samples of `passages` passages (one holds the answer), at most `target_tokens`
    tokens each (blocks and question text). pool_size: the samples draw their passages from one
    pool of this many passages (None: every sample has passages of its own). header: an
    instruction-header block first. answer_form: "code" asks for the code alone; "sentence" asks
    to repeat the fact ("Repeat the sentence about the <entity>." -> "The code of the <entity> is
    <code>."), an answer a model can copy word by word from the passage; "label" states the
    fact as "The <entity> <code words>." and answers the code question with it (module doc).
    questions: the user asks
    about this many distinct passages in turn, each answered (training rows with more supervision
    per sample; evaluation reads one-question rows); the earlier turns come on top of
    target_tokens, which bounds the blocks and the last question. distinct_words: the entities of
    a sample share no word, so any one word of the question names its passage (an easier look-up,
    for models trained from scratch; at most 8 passages, no pool)."""

    num_samples: int = 100
    passages: int = 8
    target_tokens: int = 1024
    pool_size: int | None = None
    header: bool = True
    seed: int = 0
    answer_form: str = "code"
    questions: int = 1
    distinct_words: bool = False

    def __post_init__(self) -> None:
        for name in ("num_samples", "passages", "target_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.passages > len(ENTITIES):
            raise ValueError(f"--passages {self.passages}: there are {len(ENTITIES)} distinct entities")
        if self.pool_size is not None and not self.passages <= self.pool_size <= len(ENTITIES):
            raise ValueError(f"--pool-size must be in [--passages {self.passages}, {len(ENTITIES)}] (the distinct "
                             f"entities), got {self.pool_size}")
        if self.distinct_words and (self.pool_size is not None or self.passages > len(_CONTAINERS)):
            raise ValueError(f"--distinct-words needs no --pool-size and at most {len(_CONTAINERS)} passages (the "
                             f"kinds of container), got passages={self.passages}, pool_size={self.pool_size}")
        if not 1 <= self.questions <= self.passages:
            raise ValueError(f"--questions must be in [1, --passages {self.passages}], got {self.questions}")
        if self.answer_form not in ANSWER_FORMS:
            raise ValueError(f"--answer-form must be one of {ANSWER_FORMS}, got {self.answer_form!r}")
        codes = self.passages if self.pool_size is None else self.pool_size
        if self.answer_form == "label" and codes * CODE_LENGTH > len(CODE_WORDS):
            raise ValueError(f"--answer-form label: {codes} codes of {CODE_LENGTH} distinct code words need "
                             f"{codes * CODE_LENGTH} of the {len(CODE_WORDS)} there are; use at most "
                             f"{len(CODE_WORDS) // CODE_LENGTH} passages (and pool size)")


@dataclass(frozen=True)
class RagSample:
    """blocks: the local blocks (the header, then the passages); question and answer: the last user
    and assistant turns; answer_block: the index in `blocks` of the passage holding that answer;
    earlier: (question, answer) turns before them (RagTaskConfig.questions)."""

    index: int
    blocks: tuple[str, ...]
    question: str
    answer: str
    answer_block: int
    target_tokens: int
    earlier: tuple[tuple[str, str], ...] = ()

    def messages(self) -> list[dict[str, str]]:
        return [{"role": role, "content": text} for turn in (*self.earlier, (self.question, self.answer))
                for role, text in zip(("user", "assistant"), turn)]

    def row(self) -> dict[str, Any]:
        return {"blocks": list(self.blocks), "messages": self.messages(),
                "meta": {"index": self.index, "answer_block": self.answer_block, "target_tokens": self.target_tokens}}


@dataclass(frozen=True)
class _Entry:
    """One passage before sizing: its fact, its filler stream's seed, the fact's relative depth."""

    entity: str
    value: str
    filler_seed: int
    depth: float
    answer_form: str

    def text(self, sentences: int) -> str:
        rng = random.Random(self.filler_seed)
        filler = [rng.choice(FILLER_SENTENCES) for _ in range(sentences)]
        at = min(int(self.depth * (sentences + 1)), sentences)
        return " ".join([*filler[:at], _fact(self.entity, self.value, self.answer_form), *filler[at:]])


def _entries(rng: random.Random, count: int, answer_form: str, distinct_words: bool = False) -> list[_Entry]:
    """`count` passages with distinct entities (with `distinct_words`, no two share a word) and
    distinct values (six digits; in the label form CODE_LENGTH code words, none used twice)."""
    if distinct_words:
        words = [rng.sample(group, count) for group in (_ADJECTIVES, _ANIMALS, _CONTAINERS)]
        entities = [" ".join(parts) for parts in zip(*words)]
    else:
        entities = rng.sample(ENTITIES, count)
    if answer_form == "label":
        code_words = rng.sample(CODE_WORDS, CODE_LENGTH * count)
        values = [" ".join(code_words[i:i + CODE_LENGTH]) for i in range(0, len(code_words), CODE_LENGTH)]
    else:
        values = [str(value) for value in rng.sample(range(100_000, 1_000_000), count)]
    return [_Entry(entity, value, rng.getrandbits(32), rng.random(), answer_form)
            for entity, value in zip(entities, values)]


def _fill(entry: _Entry, budget: int, count_tokens: Callable[[str], int]) -> str:
    """The entry's text with the most filler sentences that keeps it within `budget` tokens."""
    def fits(sentences: int) -> bool:
        return count_tokens(entry.text(sentences)) <= budget

    if not fits(0):
        raise ValueError(f"the target length leaves {budget} tokens per passage, too few: a passage's fact alone "
                         f"needs {count_tokens(entry.text(0))}; raise the target (--target-tokens, or --lengths of "
                         f"focusft eval) or use fewer passages")
    low, high = 0, 1
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:  # fits(low), not fits(high)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return entry.text(low)


def rag_samples(config: RagTaskConfig, count_tokens: Callable[[str], int]) -> list[RagSample]:
    """The task's samples, sized in `count_tokens` (module doc: the size bound)."""
    header = (HEADER,) if config.header else ()
    room = config.target_tokens - sum(count_tokens(h) for h in header)  # for the passages and the question
    if config.pool_size is not None:
        pool = _entries(random.Random(f"{config.seed}:rag:pool:{config.pool_size}"), config.pool_size,
                        config.answer_form)
        largest = max(count_tokens(_turns(e.entity, e.value, config.answer_form)[0]) for e in pool)
        pool_budget = (room - largest) // config.passages
        pool_texts: dict[int, str] = {}  # filled when first drawn
    samples = []
    for index in range(config.num_samples):
        rng = random.Random(f"{config.seed}:rag:sample:{index}")
        if config.pool_size is None:
            entries = _entries(rng, config.passages, config.answer_form, config.distinct_words)
        else:
            chosen = rng.sample(range(config.pool_size), config.passages)
            entries = [pool[i] for i in chosen]
        order = [rng.randrange(config.passages)] if config.questions == 1 else rng.sample(range(config.passages),
                                                                                          config.questions)
        turns = [_turns(entries[i].entity, entries[i].value, config.answer_form) for i in order]
        answer, (asked, reply) = order[-1], turns[-1]
        if config.pool_size is None:
            budget = (room - count_tokens(asked)) // config.passages
            texts = [_fill(entry, budget, count_tokens) for entry in entries]
        else:
            for i in chosen:
                if i not in pool_texts:
                    pool_texts[i] = _fill(pool[i], pool_budget, count_tokens)
            texts = [pool_texts[i] for i in chosen]
        samples.append(RagSample(index, (*header, *texts), asked, reply, len(header) + answer,
                                 config.target_tokens, tuple(turns[:-1])))
    return samples


def write_rag_jsonl(path: str | os.PathLike, samples: Sequence[RagSample]) -> None:
    """One block row per sample (module doc), in order."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(sample.row(), ensure_ascii=False) + "\n" for sample in samples)
