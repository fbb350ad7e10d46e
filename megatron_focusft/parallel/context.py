"""The explicit parallel context of a step: the model's process groups and this rank's place in them.

Method code takes one of these instead of reading Megatron's global `parallel_state`; it is built
from the model (`GPTModel.pg_collection`, the groups Megatron built the model's layers with), so
a step communicates over exactly the groups its layers were sharded for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    """Tensor-, context- and pipeline-parallel groups of one model replica."""

    tp: dist.ProcessGroup
    cp: dist.ProcessGroup
    pp: dist.ProcessGroup

    @classmethod
    def of(cls, model: torch.nn.Module) -> ParallelContext:
        """From a GPTModel or its DDP wrapper."""
        gpt = model.module if hasattr(model, "module") else model
        groups = gpt.pg_collection
        return cls(tp=groups.tp, cp=groups.cp, pp=groups.pp)

    @property
    def tp_rank(self) -> int:
        return self.tp.rank()

    @property
    def tp_size(self) -> int:
        return self.tp.size()

    @property
    def cp_size(self) -> int:
        return self.cp.size()

    def tp_all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        """In place over the TP group (a no-op for a group of one); returns `tensor`."""
        return _all_reduce(tensor, self.tp, op)

    def cp_all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        return _all_reduce(tensor, self.cp, op)

    def pp_all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        return _all_reduce(tensor, self.pp, op)


def _all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup, op: dist.ReduceOp) -> torch.Tensor:
    if group.size() > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor
