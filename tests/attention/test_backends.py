"""The attention-backend registry: one record per backend, read by the spec, CP and the flags."""

from __future__ import annotations

import pytest
import torch

from megatron_focusft.attention.backends import (
    AttentionBackend,
    attention_backend,
    attention_backend_names,
    get_attention_backend,
    register_attention_backend,
)
from megatron_focusft.attention.sdpa import sdpa_attention
from megatron_focusft.training.arguments import parse_training_args


def test_records_of_the_three_backends():
    assert attention_backend_names() == ("sdpa", "flex", "te")
    assert get_attention_backend("sdpa") is sdpa_attention
    assert [attention_backend(n).cp_path for n in attention_backend_names()] == ["dense", "flex", None]
    assert attention_backend("flex").chunk_multiple == 128 and attention_backend("sdpa").chunk_multiple == 1
    assert attention_backend("sdpa").cpu_backward and not attention_backend("flex").cpu_backward


def test_unknown_and_duplicate_backends_are_refused():
    with pytest.raises(ValueError, match=r"unknown attention backend 'nope'; expected one of \('sdpa', 'flex', 'te'\)"):
        attention_backend("nope")
    with pytest.raises(ValueError, match="registered already"):
        register_attention_backend(AttentionBackend("sdpa", "x:y", None, 1, False, ""))


def test_training_flags_take_their_choices_cp_and_cpu_support_from_the_registry(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in attention_backend_names():
        assert parse_training_args(["--train-iters", "1", "--mock-data", "--attention-backend", name]).attention_backend == name
    with pytest.raises(SystemExit):
        parse_training_args(["--train-iters", "1", "--mock-data", "--attention-backend", "te",
                             "--context-parallel-size", "2"])
    assert "needs --attention-backend sdpa or flex (te has no CP path" in capsys.readouterr().err
    # Without CUDA only the backends with a CPU backward can train.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in attention_backend_names():
        argv = ["--train-iters", "1", "--mock-data", "--attention-backend", name]
        if attention_backend(name).cpu_backward:
            assert parse_training_args(argv).attention_backend == name
        else:
            with pytest.raises(SystemExit):
                parse_training_args(argv)
            assert f"--attention-backend {name} has no backward pass on the CPU" in capsys.readouterr().err
