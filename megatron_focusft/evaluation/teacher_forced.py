"""Teacher-forced answer scoring of a plain model on the long-context task's chats.

One forward per sample under the FocuSFT mask (bidirectional context, causal answer). An answer
is correct when the argmax at each of its symbol tokens is that token (exact match; with one
forward this equals greedy decoding after a bidirectional prefill of the context); the
end-of-turn token is not scored. ``token_accuracy`` is the fraction of symbol tokens right. The
best context-free guess (``baseline``) predicts the successor of the previous answer token in
the sorted symbol alphabet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from megatron_focusft.data.batch import SegmentBatch, make_batch
from megatron_focusft.data.long_context_task import SYMBOLS
from megatron_focusft.data.tokenizer import ByteChatTokenizer


def answer_spans(response: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each answer's content tokens in one sample: its response runs without the end token.

    response: [s] 0/1 flags. A run of one token (the end token alone) has no content and is skipped.
    """
    flags = response.tolist() + [0]
    spans, start = [], None
    for i, flag in enumerate(flags):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            if i - 1 > start:
                spans.append((start, i - 1))
            start = None
    return spans


def context_free_guess(previous: Sequence[int]) -> int:
    """Best guess of the next answer token (byte-chat id) without the context.

    The sorted answer's next symbol is most likely the successor of the previous one in the
    symbol alphabet; the first is most likely the first symbol.
    """
    ids = [ByteChatTokenizer.FIRST_BYTE_ID + ord(c) for c in SYMBOLS]
    if not previous:
        return ids[0]
    i = ids.index(previous[-1]) if previous[-1] in ids else -1
    return ids[min(i + 1, len(ids) - 1)]


@torch.no_grad()
def evaluate(model: torch.nn.Module, samples: Any, rows_per_batch: int = 1) -> dict[str, float]:
    """Exact-match and token accuracy, response loss of `model`, and the context-free guess's accuracies.

    samples: equal-length chat samples (``sample(i)`` -> tokens [s], response flags [s]). The
    model maps (tokens [b, s], position_ids [b, s], SegmentMask) to logits [b, s, vocab]; the
    logit at t scores token t + 1, under the FocuSFT mask.
    """
    was_training = model.training
    model.eval()
    exact = right = answers = answer_tokens = base_exact = base_right = 0
    loss_sum = loss_tokens = 0.0
    try:
        for lo in range(0, len(samples), rows_per_batch):
            rows = [samples.sample(i) for i in range(lo, min(lo + rows_per_batch, len(samples)))]
            tokens = torch.stack([t.long() for t, _ in rows])
            response = torch.stack([r.long() for _, r in rows])
            batch = make_batch(tokens, torch.zeros_like(tokens), response, mask_kind="focusft")
            logits = model(batch.tokens, batch.position_ids, batch.attention).float()  # [b, s, v]
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.labels, reduction="none")
            loss_sum += float((ce * batch.loss_mask).sum())
            loss_tokens += float(batch.loss_mask.sum())
            predicted = logits.argmax(dim=-1)
            for row in range(tokens.shape[0]):
                for start, end in answer_spans(response[row]):
                    truth = tokens[row, start:end].tolist()
                    hits = (predicted[row, start - 1:end - 1] == tokens[row, start:end]).tolist()
                    guess = [context_free_guess(truth[:j]) == t for j, t in enumerate(truth)]
                    exact += all(hits)
                    right += sum(hits)
                    base_exact += all(guess)
                    base_right += sum(guess)
                    answers += 1
                    answer_tokens += len(truth)
    finally:
        model.train(was_training)
    if answers == 0:
        raise ValueError("no answer to score: the samples have no response run longer than its end token")
    return {"accuracy": exact / answers, "token_accuracy": right / answer_tokens,
            "baseline_accuracy": base_exact / answers, "baseline_token_accuracy": base_right / answer_tokens,
            "answers": answers, "response_loss": loss_sum / loss_tokens}


def probe_batch(samples: Any, count: int) -> SegmentBatch:
    """The first `count` samples as one FocuSFT-mask batch [min(count, len(samples)), s] (for the attention metrics)."""
    rows = [samples.sample(i) for i in range(min(count, len(samples)))]
    tokens = torch.stack([t.long() for t, _ in rows])
    return make_batch(tokens, torch.zeros_like(tokens), torch.stack([r.long() for _, r in rows]), mask_kind="focusft")
