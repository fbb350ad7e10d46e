"""Offline generators of RULER-style and BABILong-style long-context tasks, sized in tokens.

Every sample is built from a seeded `random.Random` (seed, task, length, index), so a run is
reproducible and a prompt does not depend on the other samples. A prompt is a haystack of
filler sentences with the task's facts inserted at random depths; the number of filler
sentences is the largest whose whole prompt fits `length` tokens of the model's own tokenizer
(`count_tokens`), found by bisection. The wording is ours; the task designs follow RULER
(arXiv 2404.06654: needle in a haystack with single / multiple keys, values and queries,
variable tracking, common and frequent words extraction, QA among distractor passages) and
BABILong (arXiv 2406.10149: bAbI QA1-QA5 facts spread through long filler text).

Haystacks: `noise` (a few plain sentences repeated), `essay` (essay-like sentences generated
from word lists), `needle` (distractor needles with other keys). NIAH values are 7-digit numbers,
or in the `*_word` tasks a word of VALUE_WORDS (RULER's "words" value type), which nothing else
in a prompt uses. WORD_TASKS are the tasks made only of list words: a word-level tokenizer of
`vocabulary_texts()` encodes them without <unk> (the demo's tokenizer).

Block tasks (`RagTaskSpec`): the RAG-style task of data/rag_task.py, passages as local blocks
and the question as the global block; `length` bounds its blocks and question text (its size
bound is in that module's doc), and its samples are those `focusft data rag` writes for the same
seed, length and layout.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from megatron_focusft.data.rag_task import RagTaskConfig, rag_samples
from megatron_focusft.evaluation.samples import EvalSample, sample_of_rag_row

_NOISE = ("The path along the river is quiet in the morning.", "Boats drift slowly under the old stone bridge.",
          "A light wind moves through the tall grass.", "The town clock strikes every hour on the hour.",
          "Children play near the fountain in the square.")
_SUBJECTS = ("The committee", "A young engineer", "The old sailor", "Our neighbour", "The museum guide", "A farmer",
             "The orchestra", "The city council", "A travelling merchant", "The librarian", "The research team")
_VERBS = ("discussed", "repaired", "painted", "studied", "described", "measured", "planned", "collected", "praised")
_OBJECTS = ("the northern bridge", "a set of maps", "the winter harvest", "an unusual clock", "the harbour walls",
            "several letters", "the train schedule", "a garden of roses", "the mountain road", "an old violin")
_ENDINGS = ("before sunrise", "with great care", "during the long summer", "for the annual fair", "in the rain",
            "without much help", "after the storm", "over several weeks", "near the market", "at the request of friends")
WORDS = ("apple anchor badge banner beacon bottle bridge cabin candle canyon carpet castle cedar chalk cherry cloud "
         "comet copper coral cotton crystal dagger desert dragon eagle ember falcon feather fern forest fossil garden "
         "garnet glacier granite harbor hazel helmet island ivory jacket jasmine jungle kettle lantern lemon lily "
         "marble meadow mirror mosaic nectar needle oasis olive orchid panther parrot pebble pepper pilot planet "
         "prism quartz quill rabbit raven ribbon river saddle salmon satin shadow silver spruce stone summit temple "
         "thistle thunder timber topaz tulip valley velvet violet walnut willow winter wizard zephyr").split()
# Values of the word-valued NIAH tasks: no key, haystack or other task uses these words.
VALUE_WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
               "upsilon phi chi psi omega").split()
_NAMES = ("Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kira", "Luca",
          "Mina", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sami", "Tara")
_CITIES = ("Lisbon", "Oslo", "Kyoto", "Quito", "Accra", "Hanoi", "Dublin", "Perth", "Lima", "Riga", "Tunis", "Cusco")
_JOBS = ("baker", "pilot", "nurse", "architect", "chemist", "teacher", "tailor", "geologist")
_PLACES = ("kitchen", "garden", "hallway", "bedroom", "office", "bathroom", "garage", "cellar")
_THINGS = ("apple", "football", "milk", "book", "key", "umbrella")


def _filler(rng: random.Random, kind: str, count: int) -> list[str]:
    if kind == "noise":
        return [_NOISE[i % len(_NOISE)] for i in range(count)]
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}."
            for _ in range(count)]


def _insert(rng: random.Random, haystack: list[str], facts: Sequence[str]) -> str:
    """The facts at random depths of the haystack, in their given order."""
    positions = sorted(rng.randint(0, len(haystack)) for _ in facts)
    out = list(haystack)
    for offset, (position, fact) in enumerate(zip(positions, facts)):
        out.insert(position + offset, fact)
    return " ".join(out)


def _code(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _keys(rng: random.Random, count: int) -> list[str]:
    return [f"{a}-{b}" for a, b in (rng.sample(WORDS, 2) for _ in range(count))]


def _needle(key: str, value: str) -> str:
    return f"The secret code for {key} is {value}."


def _word_value(rng: random.Random) -> str:
    return rng.choice(VALUE_WORDS)


def _niah(kind: str, haystack: str, keys: int = 1, values: int = 1, queries: int = 1, value: str = "number"):
    """kind single / multikey / multivalue / multiquery; `keys` needles of other keys are distractors;
    value "number" (7 digits, as RULER's numbers) or "word" (RULER's words value type)."""
    new_value = _code if value == "number" else _word_value

    def build(rng: random.Random, n: int) -> tuple[str, tuple[str, ...]]:
        all_keys = _keys(rng, max(keys, queries))
        asked = all_keys[:queries]
        facts = {key: [new_value(rng) for _ in range(values if key in asked else 1)] for key in all_keys}
        needles = [_needle(key, value) for key, vals in facts.items() for value in vals]
        if haystack == "needle":  # the haystack itself is distractor needles
            filler = [_needle(key, new_value(rng)) for key in _keys(rng, n)]
        else:
            filler = _filler(rng, haystack, n)
        rng.shuffle(needles)
        text = _insert(rng, filler, needles)
        plural = values > 1 or queries > 1
        asked_text = ", ".join(asked)
        prompt = (f"Some secret codes are hidden in the text below. Read it carefully: afterwards you will be asked "
                  f"for {'some of them' if plural else 'one of them'}.\n\n{text}\n\nQuestion: What "
                  f"{'are all the secret codes' if plural else 'is the secret code'} for {asked_text} in the text "
                  f"above?")
        return prompt, tuple(v for key in asked for v in facts[key])
    return build


def _variable_tracking(hops: int = 4):
    def build(rng: random.Random, n: int) -> tuple[str, tuple[str, ...]]:
        names = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)) for _ in range(hops + 1)]
        value = str(rng.randint(10_000, 99_999))
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
        text = _insert(rng, _filler(rng, "noise", n), chain)
        prompt = (f"Memorize every variable assignment in the text below.\n\n{text}\n\nQuestion: Which variables are "
                  f"assigned the value {value}, directly or through other variables?")
        return prompt, tuple(names)
    return build


def _common_words(common: int = 10):
    def build(rng: random.Random, n: int) -> tuple[str, tuple[str, ...]]:
        vocabulary = rng.sample(WORDS, len(WORDS))
        frequent, rare = vocabulary[:common], vocabulary[common:]
        # n rare entries cycle through the rare words (each at most ceil(n / len(rare)) times);
        # every common word appears more often than that.
        repeats = n // len(rare) + 3
        items = frequent * repeats + [rare[i % len(rare)] for i in range(n)]
        rng.shuffle(items)
        listing = " ".join(f"{i + 1}. {word}" for i, word in enumerate(items))
        prompt = (f"Below is a numbered list of words.\n\n{listing}\n\nQuestion: Which {common} words appear most "
                  f"often in the list above?")
        return prompt, tuple(frequent)
    return build


def _frequent_words(top: int = 3, alpha: float = 2.0, vocabulary: int = 30):
    def build(rng: random.Random, n: int) -> tuple[str, tuple[str, ...]]:
        coded: list[str] = []
        while len(coded) < vocabulary:  # distinct two-syllable nonsense words
            word = "".join(rng.choice("bcdfghjklmnpqrstvwxz") + rng.choice("aeiou") for _ in range(2))
            coded += [] if word in coded else [word]
        # Zipf-like counts over n words in all, strictly decreasing at the top so the answer is unique.
        counts = [max(1, round(n / (rank + 1) ** alpha)) for rank in range(vocabulary)]
        for rank in reversed(range(top)):
            counts[rank] = max(counts[rank], counts[rank + 1] + 1)
        tokens = [word for word, count in zip(coded, counts) for _ in range(count)]
        rng.shuffle(tokens)
        prompt = (f"Below is a text of coded words.\n\n{' '.join(tokens)}\n\nQuestion: What are the {top} most "
                  f"frequent coded words in the text above?")
        return prompt, tuple(coded[:top])
    return build


def _passage_qa():
    def build(rng: random.Random, n: int) -> tuple[str, tuple[str, ...]]:
        people = [f"{rng.choice(_NAMES)} {rng.choice(WORDS).capitalize()}son" for _ in range(max(2, n // 8 + 2))]
        people = list(dict.fromkeys(people))
        passages = [f"Passage {i + 1}: {person} lives in {rng.choice(_CITIES)} and works as a {rng.choice(_JOBS)}. "
                    + " ".join(_filler(rng, "essay", 6)) for i, person in enumerate(people)]
        target = rng.randrange(len(people))
        city = passages[target].split(" lives in ", 1)[1].split(" ", 1)[0]
        prompt = ("Answer the question using the passages.\n\n" + "\n\n".join(passages)
                  + f"\n\nQuestion: In which city does {people[target]} live?")
        return prompt, (city,)
    return build


def _babilong(task: int):
    """bAbI QA1-QA5-like facts spread through essay filler."""
    def build(rng: random.Random, n: int) -> tuple[str, tuple[str, ...]]:
        a, b, c = rng.sample(_NAMES, 3)
        p1, p2, p3 = rng.sample(_PLACES, 3)
        thing = rng.choice(_THINGS)
        if task == 1:
            facts, question, answer = [f"{a} went to the {p1}.", f"{b} moved to the {p2}.", f"{a} travelled to the {p3}."], \
                f"Where is {a}?", p3
        elif task == 2:
            facts, question, answer = [f"{a} picked up the {thing}.", f"{b} went to the {p1}.",
                                       f"{a} went to the {p2}."], f"Where is the {thing}?", p2
        elif task == 3:
            facts, question, answer = [f"{a} picked up the {thing}.", f"{a} went to the {p1}.", f"{a} went to the {p2}.",
                                       f"{a} dropped the {thing}."], f"Where was the {thing} before the {p2}?", p1
        elif task == 4:
            facts, question, answer = [f"The {p1} is north of the {p2}.", f"The {p3} is south of the {p2}."], \
                f"What is north of the {p2}?", p1
        else:
            facts, question, answer = [f"{a} gave the {thing} to {b}.", f"{b} handed the {thing} to {c}."], \
                f"Who gave the {thing} to {b}?", a
        text = _insert(rng, _filler(rng, "essay", n), facts)
        return f"{text}\n\nQuestion: {question} Answer with one word.", (answer,)
    return build


@dataclass(frozen=True)
class TaskSpec:
    """build(rng, n) -> (prompt, references) with n filler units; metric from evaluation/scoring.py."""

    name: str
    build: Callable[[random.Random, int], tuple[str, tuple[str, ...]]]
    metric: str
    max_new_tokens: int
    family: str = "ruler"


@dataclass(frozen=True)
class RagTaskSpec:
    """A block task: `passages` passages per sample (data/rag_task.py), drawn from one pool of
    `pool_size` shared by the samples (so block attention reuses cached passages), or each
    sample's own (None)."""

    name: str
    passages: int
    pool_size: int | None
    metric: str = "part"
    max_new_tokens: int = 16
    family: str = "rag"


TASKS: dict[str, TaskSpec | RagTaskSpec] = {spec.name: spec for spec in (
    TaskSpec("niah_single_noise", _niah("single", "noise"), "all", 16),
    TaskSpec("niah_single_essay", _niah("single", "essay"), "all", 16),
    TaskSpec("niah_multikey_essay", _niah("multikey", "essay", keys=4), "all", 16),
    TaskSpec("niah_multikey_needle", _niah("multikey", "needle", keys=1), "all", 16),
    TaskSpec("niah_single_noise_word", _niah("single", "noise", value="word"), "all", 8),
    TaskSpec("niah_single_essay_word", _niah("single", "essay", value="word"), "all", 8),
    TaskSpec("niah_multikey_essay_word", _niah("multikey", "essay", keys=4, value="word"), "all", 8),
    TaskSpec("niah_multivalue_essay_word", _niah("multivalue", "essay", values=4, value="word"), "all", 16),
    TaskSpec("niah_multivalue_essay", _niah("multivalue", "essay", values=4), "all", 48),
    TaskSpec("niah_multiquery_essay", _niah("multiquery", "essay", keys=4, queries=4), "all", 48),
    TaskSpec("vt", _variable_tracking(), "all", 32),
    TaskSpec("cwe", _common_words(), "all", 64),
    TaskSpec("fwe", _frequent_words(), "all", 24),
    TaskSpec("qa_passages", _passage_qa(), "part", 16),
    *(TaskSpec(f"babilong_qa{i}", _babilong(i), "babilong", 8, "babilong") for i in range(1, 6)),
    RagTaskSpec("rag", passages=8, pool_size=None),
    RagTaskSpec("rag_shared", passages=8, pool_size=32),
)}


# Tasks whose every word comes from the lists above (variable tracking and frequent words make up
# random letter strings): a word-level tokenizer of `vocabulary_texts()` encodes them without <unk>.
WORD_TASKS = tuple(name for name, spec in TASKS.items() if isinstance(spec, TaskSpec) and name not in ("vt", "fwe"))


def vocabulary_texts(seeds: int = 8) -> list[str]:
    """Texts holding every word of WORD_TASKS in every position the prompts put it: each list
    word alone, after a space, capitalised and as a surname; each fixed sentence and phrase; and
    `seeds` short prompts and answers of every word task (the templates around the facts)."""
    words = [w for group in (WORDS, VALUE_WORDS, _NAMES, _CITIES, _JOBS, _PLACES, _THINGS) for w in group]
    texts = [f"{w} {w} {w.capitalize()} {w.capitalize()}son" for w in words]
    texts += [f"{phrase}." for group in (_NOISE, _SUBJECTS, _VERBS, _OBJECTS, _ENDINGS) for phrase in group]
    texts += [" ".join(group) for group in (_NOISE, _SUBJECTS, _VERBS, _OBJECTS, _ENDINGS)]
    for name in WORD_TASKS:
        for seed in range(seeds):
            prompt, references = TASKS[name].build(random.Random(f"vocabulary:{seed}"), 2)
            texts += [prompt, ", ".join(references)]
    return texts


def _fits(spec: TaskSpec, seed: str, n: int, length: int, count_tokens: Callable[[str], int]):
    prompt, refs = spec.build(random.Random(seed), n)
    return count_tokens(prompt) <= length, prompt, refs


def generate_samples(task: str, length: int, num_samples: int, count_tokens: Callable[[str], int],
                     seed: int = 0) -> list[EvalSample]:
    """`num_samples` prompts of `task` of at most `length` tokens (as counted by `count_tokens`,
    the model's tokenizer; the chat template adds its few tokens on top). A block task's blocks
    and question together are at most `length` tokens."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    spec = TASKS[task]
    if isinstance(spec, RagTaskSpec):
        config = RagTaskConfig(num_samples, spec.passages, length, spec.pool_size, seed=seed)
        return [sample_of_rag_row(s.row(), task, spec.metric, spec.max_new_tokens, f"{task} sample {s.index}")
                for s in rag_samples(config, count_tokens)]
    samples = []
    for index in range(num_samples):
        sample_seed = f"{seed}:{task}:{length}:{index}"
        ok, prompt, refs = _fits(spec, sample_seed, 1, length, count_tokens)
        if not ok:
            raise ValueError(f"{task}: even the shortest prompt ({count_tokens(prompt)} tokens) exceeds --lengths "
                             f"{length}")
        low, high = 1, 2
        while _fits(spec, sample_seed, high, length, count_tokens)[0]:
            low, high = high, high * 2
        while high - low > 1:  # largest n that fits: fits(low), not fits(high)
            mid = (low + high) // 2
            low, high = (mid, high) if _fits(spec, sample_seed, mid, length, count_tokens)[0] else (low, mid)
        _, prompt, refs = _fits(spec, sample_seed, low, length, count_tokens)
        samples.append(EvalSample(task, length, index, prompt, refs, spec.metric, spec.max_new_tokens))
    return samples
