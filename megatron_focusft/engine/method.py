"""What a training method declares to the entry point: its flags, its checkpoint keys and how it
sets up a run. A method is one package plus one `TrainingMethod` record (training/methods.py
lists them); the entry point has no per-method branches.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_focusft.data.chat import SampleForms
from megatron_focusft.data.tokenizer import ChatTokenizer
from megatron_focusft.engine.train_step import ForwardStep
from megatron_focusft.fastweights import FastWeightConfig
from megatron_focusft.models.presets import ModelPreset


@dataclass(frozen=True)
class MethodRun:
    """One run's forward step, and how to continue its own state in a resumed run.

    resume(micro_batches_done): the method's per-micro-batch state (FocuSFT: how many initial
    fast weights were drawn) after that many micro-batches; the same on every rank, so it needs
    no checkpoint entry of its own.
    """

    forward_step: ForwardStep
    resume: Callable[[int], None] = lambda micro_batches_done: None


@dataclass(frozen=True)
class MethodModel:
    """What the model and data must be for a method under the parsed flags.

    sample_forms(tokenizer, seq_length) -> data.chat.SampleForms: the samples each chat row
    gives (None: one sample per row); block_sink_tokens: block sink embeddings the model holds.
    """

    mask_kind: str  # the attention mask the data is packed under
    fast_weights: FastWeightConfig | None  # adapters the model is built with (None: none)
    sample_forms: Callable[[ChatTokenizer, int], SampleForms] | None = None
    block_sink_tokens: int = 0


@dataclass(frozen=True)
class StageBalance:
    """`--pipeline-balance auto`'s choice: decoder layers per (virtual) stage in layer order, a line
    describing the split, and the costs it was measured from (the method's schedule plans its order
    from them; None: it has no plan to make)."""

    counts: tuple[int, ...]
    description: str
    measured_costs: Any = None


@dataclass(frozen=True)
class TrainingMethod:
    """name: the --training-mode value. add_arguments: adds the method's own flags to its group.
    resume_keys: those flags a resumed run must share with the run that saved the checkpoint.
    model(args) -> MethodModel; run(args, model_config, dp_rank, shape, balanced) -> MethodRun,
    after the model is built (dp_rank: this rank's data-parallel index, e.g. for per-rank seeds;
    shape: the model's ModelPreset; balanced: the StageBalance the model was built with, None
    without `--pipeline-balance auto`). validate(args):
    ValueError naming the flag for values of the method's flags it cannot run, called with the
    other flag checks before anything starts. balance(args, model, micro_batch, num_micro_batches)
    -> StageBalance: `--pipeline-balance auto`'s split, from costs measured on the model as built
    (even stages); None: the method cannot balance."""

    name: str
    help: str
    add_arguments: Callable[[argparse._ArgumentGroup], None]
    resume_keys: tuple[str, ...]
    model: Callable[[argparse.Namespace], MethodModel]
    run: Callable[[argparse.Namespace, TransformerConfig, int, ModelPreset, StageBalance | None], MethodRun]
    validate: Callable[[argparse.Namespace], None] = lambda args: None
    balance: Callable[..., StageBalance] | None = None
