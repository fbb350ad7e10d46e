"""The learned segmenter: a small boundary classifier over candidate cut points, trained here.

Legend: N candidates in a batch, B = context_bytes, W = context_words, L = levels.

Each candidate (segment/candidates.py; ``<cut 0>`` is always a block start and never scored) is
read from both sides. Form: the B UTF-8 bytes before and after it, as a bag of hashed byte 1- to
3-grams plus the E bytes next to the cut at their positions (code, tables, dialogue turns,
headings, how a line starts). Topic: the W content words before and after it (segment/lexical.py)
as learned embedding bags, compared by their product and cosine, and the cosine of their
idf-weighted counts (what TextTiling sees). An MLP gives L logits: output j is "a boundary of
level <= j + 1", so one model serves every granularity. Decoding (segment/decode.py): the candidates whose
probability at the chosen level reaches the threshold, then blocks over a token budget are split
at their most probable candidate, recursively.

A model is a directory (`save_boundary_model`): ``config.json`` (format, version, the
BoundaryModelConfig, what it was trained on) and ``model.pt`` (the torch state dict), written to
a temporary directory beside it and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from megatron_focusft.data.tokenizer import ChatTokenizer
from megatron_focusft.segment.candidates import DEFAULT_SEPARATOR, candidate_cuts, compile_separator
from megatron_focusft.segment.corpus import SegDocument
from megatron_focusft.segment.decode import decode
from megatron_focusft.segment.lexical import content_words, word_hash
from megatron_focusft.segment.registry import SegmenterSettings
from megatron_focusft.segment.tokens import token_starts

MODEL_FORMAT = "focusft-boundary-classifier"
MODEL_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"
PAD_BYTE = 256


@dataclass(frozen=True)
class BoundaryModelConfig:
    """Shape of the boundary classifier (saved in config.json).

    separator      candidate pattern.
    levels         granularity levels L, one output each.
    context_bytes  B, bytes read on each side of a candidate (their 1- to 3-grams, hashed).
    edge_bytes     E <= B, bytes next to the cut embedded with their position as well.
    context_words  W, content words read on each side.
    byte_buckets   byte n-gram hash vocabulary size; hash_buckets: word hash vocabulary size.
    byte_dim, word_dim, hidden  widths of the byte and word embeddings and of the MLP.
    """

    separator: str = DEFAULT_SEPARATOR
    levels: int = 2
    context_bytes: int = 32
    edge_bytes: int = 8
    context_words: int = 24
    byte_buckets: int = 8192
    hash_buckets: int = 4096
    byte_dim: int = 32
    word_dim: int = 32
    hidden: int = 64

    def __post_init__(self) -> None:
        compile_separator(self.separator)
        small = {k: v for k, v in asdict(self).items() if k != "separator" and v < 1}
        if small:
            raise ValueError(f"BoundaryModelConfig sizes must be >= 1, got {small}")
        if self.edge_bytes > self.context_bytes or self.context_bytes < 3:
            raise ValueError(f"need 3 <= context_bytes and edge_bytes <= context_bytes, got {self.context_bytes}, "
                             f"{self.edge_bytes}")


@dataclass(frozen=True)
class TrainConfig:
    """How `train_boundary_model` trains: Adam over shuffled mini-batches of candidates."""

    epochs: int = 12
    batch_size: int = 256
    lr: float = 6e-3
    seed: int = 0
    threads: int = 1  # torch intra-op threads while training (see `intra_op_threads`)
    progress: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.threads < 1 or not self.lr > 0:
            raise ValueError(f"epochs, batch_size and threads must be >= 1 and lr > 0, got {self}")


@contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` for the block, restored after.

    The classifier's ops are small (a few hundred rows of embedding lookups and 200-wide matmuls):
    extra threads only synchronise. Training the test's model (100 texts) on the 2-core machine
    with other work running took 72 s wall (61 s CPU) with 2 threads, 13 s with 1.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class CandidateFeatures:
    """Inputs of N candidates: bytes_left/right [N, B] (PAD_BYTE outside the text), words_left/right
    [N, W] hashed word ids (hash_buckets where there is no word), overlap [N, 3] the cosine
    similarity of the idf-weighted counts of the W / 2, W and 2 W words on each side (0 when a
    side is empty). Left windows end at the cut, right windows start at it."""

    bytes_left: torch.Tensor
    bytes_right: torch.Tensor
    words_left: torch.Tensor
    words_right: torch.Tensor
    overlap: torch.Tensor

    def __len__(self) -> int:
        return len(self.bytes_left)

    def select(self, index: torch.Tensor | slice) -> CandidateFeatures:
        return CandidateFeatures(*(getattr(self, f.name)[index] for f in fields(self)))

    @staticmethod
    def cat(parts: Sequence[CandidateFeatures]) -> CandidateFeatures:
        return CandidateFeatures(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(CandidateFeatures)))


def text_features(text: str, cuts: np.ndarray, config: BoundaryModelConfig, idf: np.ndarray) -> CandidateFeatures:
    """Features of the candidates `cuts[1:]` of one text (cut 0 is never scored); idf [hash_buckets]."""
    cuts = cuts[1:]
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    if text.isascii():
        byte_at = cuts
    else:
        widths = np.fromiter((len(ch.encode("utf-8")) for ch in text), dtype=np.int64, count=len(text))
        byte_at = np.concatenate([[0], np.cumsum(widths)])[cuts]
    b, w, pad = config.context_bytes, config.context_words, config.hash_buckets
    padded = np.concatenate([np.full(b, PAD_BYTE), data, np.full(b, PAD_BYTE)])
    words = content_words(text)
    ids = np.asarray([word_hash(word, pad) for word in words.words], dtype=np.int64)
    padded_ids = np.concatenate([np.full(2 * w, pad), ids, np.full(2 * w, pad)])
    before = np.searchsorted(words.ends, cuts, side="right")  # words[before - 2W:before] end by the cut
    after = np.searchsorted(words.starts, cuts, side="left")  # words[after:after + 2W] start after it
    # In the padded arrays, text index i sits at i + b (bytes) or i + 2w (words); both word
    # windows run outwards from the cut, so [:, :k] are the k words nearest to it.
    left = padded_ids[before[:, None] + 2 * w - 1 - np.arange(2 * w)]
    right = padded_ids[after[:, None] + 2 * w + np.arange(2 * w)]
    overlap = np.stack([_overlap(left[:, :k], right[:, :k], idf) for k in (max(1, w // 2), w, 2 * w)], axis=1)
    return CandidateFeatures(
        torch.from_numpy(padded[byte_at[:, None] + np.arange(b)]),
        torch.from_numpy(padded[byte_at[:, None] + b + np.arange(b)]),
        torch.from_numpy(left[:, :w].copy()), torch.from_numpy(right[:, :w].copy()), torch.from_numpy(overlap),
    )


def _overlap(left: np.ndarray, right: np.ndarray, idf: np.ndarray) -> np.ndarray:
    """float32 [N] cosine similarity of the idf-weighted word counts of each row of `left`, `right` [N, W]."""
    pad = len(idf)
    out = np.zeros(len(left), dtype=np.float32)
    for i, (a, b) in enumerate(zip(left, right)):
        ca, cb = Counter(a[a != pad].tolist()), Counter(b[b != pad].tolist())
        norm = math.sqrt(sum((v * idf[k]) ** 2 for k, v in ca.items()) * sum((v * idf[k]) ** 2 for k, v in cb.items()))
        if norm:
            out[i] = sum(v * cb[k] * idf[k] ** 2 for k, v in ca.items()) / norm
    return out


def inverse_document_frequency(texts: Sequence[str], buckets: int) -> np.ndarray:
    """float32 [buckets] smoothed idf of each word hash, ``log((1 + D) / (1 + df)) + 1``: words
    found in most texts (shared vocabulary) weigh little in the overlap, topic words much."""
    df = np.zeros(buckets, dtype=np.int64)
    for text in texts:
        df[sorted({word_hash(w, buckets) for w in content_words(text).words})] += 1
    return (np.log((1 + len(texts)) / (1 + df)) + 1).astype(np.float32)


class _ByteEncoder(nn.Module):
    """[N, B] bytes of one side -> [N, 2 * byte_dim]: the mean embedding of its hashed 1- to 3-grams
    (order-free: what kind of text), and the E bytes next to the cut, each embedded at its
    distance from the cut (how the line at the cut starts or ends)."""

    def __init__(self, config: BoundaryModelConfig, edge_is_end: bool) -> None:
        super().__init__()
        self.config, self.edge_is_end = config, edge_is_end
        self.ngrams = nn.EmbeddingBag(config.byte_buckets + 1, config.byte_dim, mode="mean",
                                      padding_idx=config.byte_buckets)
        self.edge = nn.EmbeddingBag(config.edge_bytes * (PAD_BYTE + 1), config.byte_dim, mode="sum")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base, buckets = PAD_BYTE + 1, self.config.byte_buckets
        # Distinct n-gram values for distinct n (a 1-gram is below base, a 2-gram below base^2 + base).
        grams = [x, base + x[:, :-1] * base + x[:, 1:],
                 base * (base + 1) + (x[:, :-2] * base + x[:, 1:-1]) * base + x[:, 2:]]
        pad = [x == PAD_BYTE, (x[:, :-1] == PAD_BYTE) & (x[:, 1:] == PAD_BYTE),
               (x[:, :-2] == PAD_BYTE) & (x[:, 1:-1] == PAD_BYTE) & (x[:, 2:] == PAD_BYTE)]
        ids = torch.cat(grams, dim=1) * 2654435761 % buckets  # Knuth's multiplicative hash
        ids = ids.masked_fill(torch.cat(pad, dim=1), buckets)  # all-padding n-grams: left out of the mean
        e = self.config.edge_bytes
        edge = x[:, -e:].flip(1) if self.edge_is_end else x[:, :e]  # position 0 touches the cut
        return torch.cat([self.ngrams(ids), self.edge(torch.arange(e) * base + edge)], dim=1)


class BoundaryClassifier(nn.Module):
    """Candidate features -> [N, L] logits (output j: boundary of level <= j + 1).

    idf [hash_buckets] (a buffer, saved with the weights) weighs the words of the overlap feature.
    """

    def __init__(self, config: BoundaryModelConfig, idf: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("idf", torch.ones(config.hash_buckets) if idf is None else idf.float())
        self.left = _ByteEncoder(config, edge_is_end=True)
        self.right = _ByteEncoder(config, edge_is_end=False)
        self.words = nn.EmbeddingBag(config.hash_buckets + 1, config.word_dim, mode="mean",
                                     padding_idx=config.hash_buckets)
        width = 4 * config.byte_dim + config.word_dim + 4
        # The embedding bags go in only through their product and cosine: fed in raw as well, they
        # let the MLP memorise training texts (150 synthetic training texts: held-out coarse-level
        # AUC 0.969 with them, 0.974 without; best-threshold F1 0.65 vs 0.69).
        self.head = nn.Sequential(nn.Linear(width, config.hidden), nn.GELU(), nn.Linear(config.hidden, config.levels))

    def forward(self, features: CandidateFeatures) -> torch.Tensor:
        words_left, words_right = self.words(features.words_left), self.words(features.words_right)  # 0 for none
        x = torch.cat([
            self.left(features.bytes_left), self.right(features.bytes_right),
            words_left * words_right,
            F.cosine_similarity(words_left, words_right, dim=1, eps=1e-6).unsqueeze(1), features.overlap,
        ], dim=1)
        return self.head(x)

    def features(self, text: str, cuts: np.ndarray) -> CandidateFeatures:
        return text_features(text, cuts, self.config, self.idf.numpy())


def candidate_targets(document: SegDocument, cuts: np.ndarray, levels: int) -> torch.Tensor:
    """[c - 1, L] float: candidate i + 1 is a boundary of level <= j + 1 (every level without levels)."""
    level_of = dict(zip(document.boundaries, document.levels or [1] * len(document.boundaries)))
    thresholds = np.arange(1, levels + 1)
    rows = [thresholds >= level_of[c] if c in level_of else np.zeros(levels, dtype=bool) for c in cuts[1:].tolist()]
    return torch.from_numpy(np.asarray(rows, dtype=np.float32).reshape(-1, levels))


@dataclass(frozen=True)
class TrainingSummary:
    """What `train_boundary_model` saw and did (saved in config.json)."""

    documents: int
    candidates: int
    positives: list[int]  # per level, candidates that are boundaries of level <= j + 1
    unreachable: int  # gold boundaries that are no candidate (no model can find them)
    losses: list[float]  # mean training loss per epoch


def train_boundary_model(documents: Sequence[SegDocument], config: BoundaryModelConfig,
                         train: TrainConfig) -> tuple[BoundaryClassifier, TrainingSummary]:
    """A classifier trained on the gold boundaries of `documents` (binary cross-entropy per level)."""
    if not documents:
        raise ValueError("no training documents")
    torch.manual_seed(train.seed)
    idf = inverse_document_frequency([d.text for d in documents], config.hash_buckets)
    model = BoundaryClassifier(config, torch.from_numpy(idf))
    parts, targets, unreachable = [], [], 0
    for document in documents:
        cuts = candidate_cuts(document.text, config.separator)
        unreachable += len(set(document.boundaries) - set(cuts.tolist()))
        parts.append(model.features(document.text, cuts))
        targets.append(candidate_targets(document, cuts, config.levels))
    features, target = CandidateFeatures.cat(parts), torch.cat(targets)
    if not len(features):
        raise ValueError("the training documents have no candidate cuts (no separator matches)")
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr)
    generator = torch.Generator().manual_seed(train.seed)
    model.train()
    losses = []
    with intra_op_threads(train.threads):
        for _ in tqdm(range(train.epochs), desc="train segmenter", unit="epoch", disable=not train.progress):
            order, total = torch.randperm(len(features), generator=generator), 0.0
            for start in range(0, len(order), train.batch_size):
                index = order[start:start + train.batch_size]
                loss = F.binary_cross_entropy_with_logits(model(features.select(index)), target[index])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(index)
            losses.append(total / len(order))
    model.eval()
    summary = TrainingSummary(len(documents), len(features), [int(v) for v in target.sum(0).tolist()],
                              unreachable, losses)
    return model, summary


@torch.no_grad()
def score_texts(model: BoundaryClassifier, texts: Sequence[str], batch_size: int = 64,
                progress: bool = False, threads: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per text (cuts [c], probabilities [c, L]); cut 0 has probability 1 at every level.

    Batches of `batch_size` texts go through the model at once, with a progress bar if asked, on
    `threads` intra-op threads.
    """
    with intra_op_threads(threads):
        return _score_texts(model, texts, batch_size, progress)


def _score_texts(model: BoundaryClassifier, texts: Sequence[str], batch_size: int,
                 progress: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    config, out = model.config, []
    batches = range(0, len(texts), batch_size)
    for start in tqdm(batches, desc="segment", unit="batch", disable=not progress):
        chunk = texts[start:start + batch_size]
        cuts = [candidate_cuts(text, config.separator) for text in chunk]
        features = CandidateFeatures.cat([model.features(t, c) for t, c in zip(chunk, cuts)])
        probs = torch.sigmoid(model(features)).numpy() if len(features) else np.zeros((0, config.levels))
        offset = 0
        for c in cuts:
            out.append((c, np.concatenate([np.ones((1, config.levels)), probs[offset:offset + len(c) - 1]])))
            offset += len(c) - 1
    return out


def save_boundary_model(model: BoundaryClassifier, directory: str | os.PathLike[str],
                        summary: TrainingSummary | None = None) -> Path:
    """Write the model directory aside, then rename it into place (replacing an older one)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta = {"format": MODEL_FORMAT, "version": MODEL_VERSION, "model": asdict(model.config),
            "training": None if summary is None else asdict(summary)}
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    torch.save(model.state_dict(), tmp / WEIGHTS_FILE)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    old = directory.with_name(f".{directory.name}.old{os.getpid()}")
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def load_boundary_model(directory: str | os.PathLike[str]) -> BoundaryClassifier:
    """The model saved in `directory`; ValueError names the directory and what is wrong."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise ValueError(f"{directory}: no {CONFIG_FILE}; not a segmenter model directory "
                         f"(`focusft segment train` writes one)") from None
    if meta.get("format") != MODEL_FORMAT or meta.get("version") != MODEL_VERSION:
        raise ValueError(f"{directory}: format {meta.get('format')!r} version {meta.get('version')!r}, expected "
                         f"{MODEL_FORMAT!r} version {MODEL_VERSION}")
    try:
        model = BoundaryClassifier(BoundaryModelConfig(**meta["model"]))
        model.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True))
    except (TypeError, RuntimeError, FileNotFoundError) as error:
        raise ValueError(f"{directory}: the model does not load: {error}") from error
    return model.eval()


def model_digest(directory: str | os.PathLike[str]) -> str:
    """sha256 of the model files: it changes whenever the weights or the config do."""
    digest = hashlib.sha256()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        digest.update((Path(directory) / name).read_bytes())
    return digest.hexdigest()


class LearnedSegmenter:
    """A trained BoundaryClassifier with a threshold, a level and an optional token budget.

    threshold  probability in (0, 1) at which a candidate becomes a boundary (default 0.5).
    level      granularity, 1 .. model levels (default: the finest).
    """

    def __init__(self, model: BoundaryClassifier, *, digest: str, threshold: float = 0.5, level: int | None = None,
                 max_block_tokens: int | None = None, tokenizer: ChatTokenizer | None = None,
                 batch_size: int = 64, progress: bool = False) -> None:
        levels = model.config.levels
        level = levels if level is None else level
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"the learned segmenter's threshold is a probability in (0, 1), got {threshold}")
        if not 1 <= level <= levels:
            raise ValueError(f"level must be in 1..{levels} (the model's levels), got {level}")
        if max_block_tokens is not None and tokenizer is None:
            raise ValueError("a block budget needs a tokenizer to count tokens")
        self.model, self.threshold, self.level = model, threshold, level
        self.max_block_tokens, self.tokenizer = max_block_tokens, tokenizer
        self.batch_size, self.progress = batch_size, progress
        tokenizer_id = None if tokenizer is None else tokenizer.identity
        self.identity = (f"learned(model={digest[:16]},threshold={threshold},level={level},"
                         f"max_block_tokens={max_block_tokens},tokenizer={tokenizer_id})")

    def segment(self, texts: Sequence[str]) -> list[list[int]]:
        out = []
        for text, (cuts, probs) in zip(texts, score_texts(self.model, texts, self.batch_size, self.progress)):
            starts = token_starts(self.tokenizer, text) if self.max_block_tokens is not None else np.zeros(0)
            out.append(decode(cuts, probs[:, self.level - 1], self.threshold, starts, self.max_block_tokens))
        return out


def learned_segmenter(settings: SegmenterSettings, tokenizer: ChatTokenizer) -> LearnedSegmenter:
    if settings.model is None:
        raise ValueError("method 'learned' needs a model directory (--model DIR, from `focusft segment train`)")
    return LearnedSegmenter(
        load_boundary_model(settings.model), digest=model_digest(settings.model),
        threshold=0.5 if settings.threshold is None else settings.threshold, level=settings.level,
        max_block_tokens=settings.max_block_tokens, tokenizer=tokenizer, batch_size=settings.batch_size,
        progress=settings.progress)

