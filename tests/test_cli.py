"""The ``focusft`` command line: bad settings are usage errors; synthetic data.

``focusft bench attention`` is tested in tests/bench/test_attention.py, ``focusft demo`` in
tests/demo/test_demo.py.
"""

from __future__ import annotations

import pytest
import torch

from megatron_focusft.cli import main
from megatron_focusft.data.synthetic import (
    ANSWER_ID,
    BOS_ID,
    EOS_ID,
    QUERY_ID,
    RetrievalPacker,
    RetrievalTaskConfig,
)


def test_bench_rejects_bad_settings(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "attention", "--device", "cpu", "--heads", "5", "--kv-heads", "2", "--seq-lengths", "64"])
    assert exc.value.code == 2
    assert "multiple of kv_heads" in capsys.readouterr().err


def test_retrieval_packer_format() -> None:
    task = RetrievalTaskConfig.fitting(96)
    first = RetrievalPacker(task, 96, 3, seed=5).next_rows()
    again = RetrievalPacker(task, 96, 3, seed=5).next_rows()
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.doc_ids, again.doc_ids)
    lo, hi = task.value_range
    for row in range(3):
        docs = first.doc_ids[row]
        for doc in docs[docs >= 0].unique().tolist():
            idx = (docs == doc).nonzero().flatten()
            assert torch.equal(idx, torch.arange(int(idx[0]), int(idx[-1]) + 1))  # contiguous
            tokens, response = first.tokens[row, idx].tolist(), first.response[row, idx].tolist()
            assert tokens[0] == BOS_ID and tokens[-1] == EOS_ID
            table = dict(zip(tokens[1:tokens.index(QUERY_ID):2], tokens[2:tokens.index(QUERY_ID):2]))
            for t in (i for i, tok in enumerate(tokens) if tok == QUERY_ID):
                key, answer = tokens[t + 1], tokens[t + 3]
                assert tokens[t + 2] == ANSWER_ID and tokens[t + 4] == EOS_ID
                assert table[key] == answer and lo <= answer < hi
                assert response[t:t + 5] == [0, 0, 0, 1, 1]
            assert sum(response) == 2 * tokens.count(QUERY_ID)
        assert (first.response[row][docs < 0] == 0).all()
