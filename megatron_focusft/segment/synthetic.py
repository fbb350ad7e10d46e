"""An offline source of texts with known block boundaries at two granularities.

A document is a run of topic sections; a section is 1-3 self-contained passages on one topic,
each of one genre (prose, code, dialogue, table, list). Adjacent sections have different topics;
adjacent passages of one section have different genres. Gold boundaries: level 1 at each
section start (a topic change), level 2 at each passage start inside a section (a genre change).

Delimiters alone do not reveal them: passages are joined by a blank line or by a single newline,
and prose paragraphs, code units and some dialogues hold blank lines inside a passage; two
sections may share a genre, so only the topic tells a paragraph break from a section start.
Every passage starts right after a newline, so each gold boundary is a candidate cut of the
default separator (segment/candidates.py). Deterministic for a seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from megatron_focusft.segment.corpus import SegDocument

# Per topic: nouns | verbs | adjectives | named entities (table rows) | table column names.
_TOPICS = {
    "glaciers": "glacier ice moraine crevasse meltwater snowfield fjord iceberg valley sediment|carve melt "
                "advance retreat grind freeze|frozen alpine polar thick blue ancient|Aletsch Perito Vatna "
                "Jakobshavn Khumbu|thickness retreat elevation",
    "volcanoes": "volcano magma lava crater ash vent caldera eruption basalt plume|erupt vent smolder flow "
                 "rumble collapse|molten active dormant explosive sulfuric fiery|Etna Kilauea Vesuvius "
                 "Fuji Hekla|height activity eruptions",
    "bees": "bee hive honey nectar pollen queen drone comb colony beekeeper|pollinate swarm forage buzz "
            "sting gather|golden busy sweet worker wild waxy|Carniolan Italian Buckfast Russian "
            "Caucasian|colonies yield temper",
    "railways": "train locomotive rail station platform carriage signal timetable track freight|depart "
                "shunt couple brake haul derail|punctual electric narrow diesel express rusty|Shinkansen "
                "Eurostar Ghan Rocky Glacier|speed length gauge",
    "chess": "chess pawn bishop knight rook gambit endgame checkmate opening tournament|castle capture "
             "promote sacrifice resign blunder|tactical positional sharp quiet decisive classical|Sicilian "
             "Ruy French Caro Najdorf|popularity draws complexity",
    "baking": "bread dough flour yeast oven crust loaf sourdough starter kneading|knead proof bake rise "
              "shape score|crusty fluffy golden rustic airy chewy|Baguette Ciabatta Focaccia Brioche "
              "Pumpernickel|hydration minutes temperature",
    "reefs": "coral reef polyp algae lagoon atoll anemone plankton current diver|bleach spawn grow filter "
             "shelter calcify|tropical shallow vibrant fragile saline turquoise|Barrier Belize Raja "
             "Tubbataha Aldabra|cover depth species",
    "telescopes": "telescope lens mirror eyepiece observatory nebula galaxy orbit aperture astronomer|observe "
                  "focus magnify track align resolve|optical faint distant celestial infrared dark|Hubble "
                  "Keck Arecibo Palomar Webb|aperture focal magnitude",
    "violins": "violin bow string bridge scroll luthier rosin fingerboard concerto orchestra|tune bow "
               "pluck varnish carve resonate|baroque mellow bright wooden delicate vintage|Stradivari "
               "Guarneri Amati Stainer Vuillaume|age value tone",
    "taxes": "tax invoice deduction audit refund ledger revenue tariff accountant payroll|file deduct "
             "audit assess withhold declare|fiscal annual taxable quarterly audited statutory|Income "
             "Payroll Excise Property Capital|rate threshold deadline",
    "basketball": "basketball hoop dribble rebound court guard forward playoff coach jersey|dribble shoot "
                  "pass defend dunk rebound|athletic fast defensive tall clutch offensive|Celtics "
                  "Lakers Bulls Warriors Spurs|titles points wins",
    "orchids": "orchid petal stem root greenhouse bloom pot bark humidity grower|bloom water repot mist "
               "prune flower|delicate fragrant epiphytic rare humid exotic|Phalaenopsis Cattleya Dendrobium "
               "Vanda Oncidium|blooms height humidity",
}
TOPICS: tuple[str, ...] = tuple(_TOPICS)
GENRES: tuple[str, ...] = ("prose", "code", "dialogue", "table", "list")

# Shared by every topic, so lexical overlap alone is never a clean signal.
_GNOUNS = "system process result level method period region sample record value group change season".split()
_GADJS = "large small recent common important early local careful steady".split()
_ADVS = "quickly slowly carefully rarely steadily".split()
_NAMES = "Ana Ben Chen Dara Eli Fay Gus Hana".split()


@dataclass(frozen=True)
class _Vocab:
    nouns: list[str]
    verbs: list[str]
    adjs: list[str]
    entities: list[str]
    attributes: list[str]


_VOCAB = {topic: _Vocab(*(part.split() for part in spec.split("|"))) for topic, spec in _TOPICS.items()}


@dataclass(frozen=True)
class SyntheticConfig:
    """Shape of the synthetic documents.

    documents       how many.
    sections        (min, max) topic sections per document, uniform.
    passages        (min, max) passages per section, uniform (at most the number of genres).
    newline_join    probability that two passages are joined by one newline instead of a blank line.
    seed            the documents are a function of the config.
    """

    documents: int = 200
    sections: tuple[int, int] = (3, 5)
    passages: tuple[int, int] = (1, 3)
    newline_join: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.documents < 1:
            raise ValueError(f"documents must be >= 1, got {self.documents}")
        if not 1 <= self.sections[0] <= self.sections[1]:
            raise ValueError(f"sections must be (min, max) with 1 <= min <= max, got {self.sections}")
        if not 1 <= self.passages[0] <= self.passages[1] <= len(GENRES):
            raise ValueError(f"passages must be (min, max) with 1 <= min <= max <= {len(GENRES)}, "
                             f"got {self.passages}")
        if not 0.0 <= self.newline_join <= 1.0:
            raise ValueError(f"newline_join must be a probability, got {self.newline_join}")


class _Writer:
    """Passages of one topic, drawn from one random stream."""

    def __init__(self, rng: random.Random, topic: str) -> None:
        self.rng, self.v = rng, _VOCAB[topic]

    def pick(self, words: list[str], k: int = 1) -> list[str]:
        return self.rng.sample(words, k)

    def sentence(self) -> str:
        n1, n2, n3 = self.pick(self.v.nouns, 3)
        verb, adj = self.pick(self.v.verbs)[0], self.pick(self.v.adjs)[0]
        gn, ga, adv = self.rng.choice(_GNOUNS), self.rng.choice(_GADJS), self.rng.choice(_ADVS)
        return self.rng.choice((
            f"Each {n1} can {verb} the {adj} {n2} during a {ga} {gn}.",
            f"In most cases the {n1} will {verb} a {n2}, which keeps the {gn} {ga}.",
            f"Experts note that a {adj} {n1} rarely needs to {verb} the {n2}.",
            f"When the {n1} starts to {verb}, the {n2} and the {n3} follow.",
            f"A {ga} {gn} helps the {n1} {verb} each {n2} more {adv}.",
            f"Nobody expected the {n1} to {verb} so {adv} near the {adj} {n2}.",
        ))

    def prose(self) -> str:
        paragraphs = [" ".join(self.sentence() for _ in range(self.rng.randint(2, 4)))
                      for _ in range(self.rng.randint(1, 3))]
        if self.rng.random() < 0.3:
            n1, n2 = self.pick(self.v.nouns, 2)
            paragraphs.insert(0, f"## {n1.capitalize()} and {n2}")
        return "\n\n".join(paragraphs)

    def code_unit(self) -> str:
        n1, n2, n3 = self.pick(self.v.nouns, 3)
        verb, gn = self.pick(self.v.verbs)[0], self.rng.choice(_GNOUNS)
        a, b = self.rng.randint(2, 9), self.rng.randint(10, 99)
        if self.rng.random() < 0.5:
            return (f"def {verb}_{n1}({n2}, {n3}):\n    \"\"\"{verb.capitalize()} the {n1} from the {n2}.\"\"\"\n"
                    f"    {gn} = {n2} * {a}\n    if {gn} > {b}:\n        return {n3} - {gn}\n"
                    f"    return {gn} + {n3}")
        return (f"class {n1.capitalize()}{gn.capitalize()}:\n    def __init__(self, {n2}):\n"
                f"        self.{n2} = {n2}\n\n    def {verb}(self):\n        return self.{n2} * {a}")

    def code(self) -> str:
        body = "\n\n".join(self.code_unit() for _ in range(self.rng.randint(1, 3)))
        return f"```python\n{body}\n```" if self.rng.random() < 0.3 else body

    def utterance(self) -> str:
        n1, n2 = self.pick(self.v.nouns, 2)
        verb, adj, gn = self.pick(self.v.verbs)[0], self.pick(self.v.adjs)[0], self.rng.choice(_GNOUNS)
        return self.rng.choice((
            f"Did the {n1} {verb} the {n2} yesterday?",
            f"I think the {adj} {n1} needs another {gn}.",
            f"Yes, and the {n2} was {adj} too.",
            f"Let us {verb} the {n1} before the {gn} ends.",
            f"Why would anyone {verb} a {adj} {n1}?",
        ))

    def dialogue(self) -> str:
        speakers = self.pick(_NAMES, 2)
        turns = [f"{speakers[i % 2]}: {self.utterance()}" for i in range(self.rng.randint(3, 6))]
        return ("\n\n" if self.rng.random() < 0.3 else "\n").join(turns)

    def table(self) -> str:
        columns = ["name", *self.v.attributes]
        lines = [f"| {' | '.join(c.capitalize() for c in columns)} |", "|" + " --- |" * len(columns)]
        for entity in self.pick(self.v.entities, self.rng.randint(2, 5)):
            lines.append(f"| {entity} | {self.rng.randint(1, 999)} | {self.pick(self.v.nouns)[0]} | "
                         f"{self.pick(self.v.adjs)[0]} |")
        if self.rng.random() < 0.4:
            lines.insert(0, f"Table: {self.pick(self.v.adjs)[0]} {self.pick(self.v.nouns)[0]} data")
        return "\n".join(lines)

    def bullets(self) -> str:
        numbered = self.rng.random() < 0.5
        items = []
        for i in range(self.rng.randint(3, 6)):
            verb, adj, noun = self.pick(self.v.verbs)[0], self.pick(self.v.adjs)[0], self.pick(self.v.nouns)[0]
            items.append(f"{f'{i + 1}.' if numbered else '-'} {verb.capitalize()} the {adj} {noun}")
        if self.rng.random() < 0.6:
            items.insert(0, f"{self.pick(self.v.adjs)[0].capitalize()} {self.pick(self.v.nouns)[0]} notes:")
        return "\n".join(items)


def synthetic_documents(config: SyntheticConfig) -> list[SegDocument]:
    """`config.documents` documents with level-1 (section) and level-2 (passage) boundaries."""
    rng = random.Random(config.seed)
    documents = []
    for _ in range(config.documents):
        text, boundaries, levels = "", [], []
        topic = None
        for section in range(rng.randint(*config.sections)):
            topic = rng.choice([t for t in TOPICS if t != topic])
            writer = _Writer(rng, topic)
            write = {"prose": writer.prose, "code": writer.code, "dialogue": writer.dialogue,
                     "table": writer.table, "list": writer.bullets}
            genre = None
            for passage in range(rng.randint(*config.passages)):
                genre = rng.choice([g for g in GENRES if g != genre])
                if text:
                    text += "\n" if rng.random() < config.newline_join else "\n\n"
                    boundaries.append(len(text))
                    levels.append(2 if passage else 1)
                text += write[genre]()
        documents.append(SegDocument(text, tuple(boundaries), tuple(levels)))
    return documents
