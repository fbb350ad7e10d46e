"""The frozen full-attention teacher of block distillation: a checkpoint of this project
(`--teacher-checkpoint`, default the student's `--pretrained-checkpoint`), built with the
student's parallel layout, weights only, no gradients."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from megatron.core.models.gpt import GPTModel

from megatron_focusft.engine.checkpoint import ASSETS_DIR, load_checkpoint, read_checkpoint_info
from megatron_focusft.engine.setup import ModelSetup, build_gpt
from megatron_focusft.models.presets import ModelPreset

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class TeacherMismatch(ValueError):
    """The teacher cannot supervise this student (shape or tokenizer)."""


def tokenizer_digest(folder: str | Path | None) -> str | None:
    """A digest of the tokenizer files in `folder` (or its model_assets/), None when it has none."""
    if folder is None:
        return None
    folder = Path(folder)
    if (folder / ASSETS_DIR).is_dir():
        folder = folder / ASSETS_DIR
    files = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def check_teacher(teacher_dir: str, teacher: ModelPreset, student: ModelPreset, student_tokenizer: str | None) -> None:
    """TeacherMismatch naming the difference: the vocabularies must be the same size and, where
    both sides ship tokenizer files, the same files."""
    if teacher.vocab_size != student.vocab_size:
        raise TeacherMismatch(f"--teacher-checkpoint {teacher_dir} has a vocabulary of {teacher.vocab_size} tokens, "
                              f"the student {student.vocab_size}: distillation needs the same vocabulary")
    ours, theirs = tokenizer_digest(student_tokenizer), tokenizer_digest(teacher_dir)
    if ours is not None and theirs is not None and ours != theirs:
        raise TeacherMismatch(f"--teacher-checkpoint {teacher_dir} ships other tokenizer files than the student's "
                              f"({student_tokenizer}): distillation needs the same tokenizer")


def load_teacher(teacher_dir: str, student: ModelPreset, student_tokenizer: str | None, setup: ModelSetup,
                 ) -> list[GPTModel]:
    """This rank's stage of the teacher (with virtual pipeline stages: its model chunks, in
    order), frozen, in eval mode; collective. `setup` is the student's parallel layout (its
    preset is replaced by the teacher's shape)."""
    info = read_checkpoint_info(teacher_dir)
    if info is None:
        raise TeacherMismatch(f"--teacher-checkpoint {teacher_dir}: no checkpoint there")
    check_teacher(teacher_dir, info.shape, student, student_tokenizer)
    if info.shape.block_sink_tokens:
        raise TeacherMismatch(f"--teacher-checkpoint {teacher_dir} holds block sink tokens: the teacher is a "
                              f"full-attention model")
    setup = dataclasses.replace(setup, preset=info.shape, fast_weights=None)
    virtual = setup.virtual_pipeline_model_parallel_size
    chunks = [build_gpt(setup, vp_stage=v)[0] for v in range(virtual)] if virtual else [build_gpt(setup)[0]]
    load_checkpoint(teacher_dir, chunks, None, None, restore_rng=False)
    for chunk in chunks:
        chunk.eval()
        for parameter in chunk.parameters():
            parameter.requires_grad_(False)
    return chunks

