"""Test-side packing helper: an endless epoch stream built from the package's packing functions."""

from __future__ import annotations

from collections.abc import Iterator

from megatron_focusft.data.batch import SegmentBatch
from megatron_focusft.data.chat import ChatSamples
from megatron_focusft.data.packing import PackingConfig, micro_batches, pack_chats


def epoch_micro_batches(samples: ChatSamples, config: PackingConfig, *, dp_rank: int = 0, dp_size: int = 1,
                        first_epoch: int = 0) -> Iterator[tuple[int, SegmentBatch]]:
    """Endless (epoch, micro-batch) stream, repacking with a new shuffle every epoch."""
    epoch = first_epoch
    while True:
        yield from ((epoch, batch) for batch in micro_batches(pack_chats(samples, config, epoch), config,
                                                              dp_rank=dp_rank, dp_size=dp_size))
        epoch += 1
