"""The named registry (registry.py): registration order, unique names, and lookups of unknown
names that list the registered ones; the attention backends and segmenters are built on it."""

from __future__ import annotations

import pytest

from megatron_focusft.registry import Registry


def test_register_get_and_names():
    registry: Registry[int] = Registry("widget")
    assert registry.register("b", 2) == 2 and registry.register("a", 1) == 1
    assert registry.get("a") == 1 and registry.names() == ("b", "a") and list(registry) == [2, 1]
    with pytest.raises(ValueError, match="widget 'a' is registered already"):
        registry.register("a", 3)
    assert registry.get("a") == 1  # the failed registration replaced nothing
    with pytest.raises(ValueError, match=r"unknown widget 'c'; expected one of \('b', 'a'\)"):
        registry.get("c")


def test_the_package_registries_use_it():
    from megatron_focusft.attention.backends import attention_backend, attention_backend_names
    from megatron_focusft.segment.registry import segmenter_method, segmenter_names

    assert {"sdpa", "flex"} <= set(attention_backend_names())
    assert set(segmenter_names()) == {"fixed", "delimiter", "texttiling", "learned"}
    with pytest.raises(ValueError, match="unknown attention backend 'nope'; expected one of"):
        attention_backend("nope")
    with pytest.raises(ValueError, match="unknown segmenter 'nope'; expected one of"):
        segmenter_method("nope")
