"""Tiny Hugging Face models built by `transformers` from a config (random weights, no download),
saved as HF directories with a word-level tokenizer and a chat template."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("the a key value is of what find tell me number city river blue red green one two three four five "
         "six seven eight nine ten answer question context passage").split()
SPECIALS = ["<unk>", "<pad>", "<s>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{%- for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
          "{%- if add_generation_prompt %}<|im_start|>assistant {% endif %}")
VOCAB = 128  # model vocabulary: the tokenizer's ids and unused ones (divisible by TP = 2)
TOKENIZER_SIZE = len(SPECIALS) + len(dict.fromkeys(WORDS))  # a model of this vocabulary only says known words

# Llama 3.1-style (rope scaling llama3, GQA, untied), Qwen2-style (QKV bias, tied, GQA), Mistral.
# initializer_range 0.1 (not 0.02) spreads the logits, so greedy choices are far from ties.
CONFIGS = {
    "llama": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, rms_norm_eps=1e-5,
                  initializer_range=0.1, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 4.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 2.0,
                                   "original_max_position_embeddings": 64}),
    "qwen2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, rms_norm_eps=1e-6,
                  initializer_range=0.1, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # Mistral without a sliding window (the only kind converted).
    "mistral": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, rms_norm_eps=1e-5,
                    initializer_range=0.1, tie_word_embeddings=False, sliding_window=None,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}


def hf_config(family: str, **overrides):
    import transformers

    return transformers.CONFIG_MAPPING[family](**{**CONFIGS[family], **overrides})


def save_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([" ".join(WORDS)], trainer=trainers.WordLevelTrainer(special_tokens=SPECIALS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="<|im_end|>")
    fast.chat_template = CHATML
    fast.save_pretrained(str(path))


def save_tiny_hf_model(family: str, path: Path, seed: int = 0, tokenizer: bool = True, **overrides):
    """An fp32 model of CONFIGS[family] saved to `path` (model.safetensors + config.json, and the
    tokenizer files); returns the model in eval mode."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **overrides), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # tests choose their stop tokens
    model.generation_config.pad_token_id = 1
    model.save_pretrained(str(path))
    if tokenizer:
        save_tokenizer(path)
    return model


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s] -> [b, s, vocab] fp32, causal, no padding."""
    with torch.no_grad():
        return model(tokens).logits.float()


def import_tiny_model(root: Path, name: str, family: str = "qwen2", seed: int = 0, **overrides) -> tuple[Path, Path]:
    """A tiny HF model at root/hf-NAME imported as a one-rank checkpoint at root/NAME (the model
    parallel state is released afterwards): (HF directory, checkpoint)."""
    from megatron_focusft.convert.commands import import_hf
    from megatron_focusft.runtime import release_model_parallel
    from tests.helpers.distributed import init_model_parallel

    hf, ckpt = root / f"hf-{name}", root / name
    save_tiny_hf_model(family, hf, seed=seed, **overrides)
    init_model_parallel()
    import_hf(hf, ckpt, log=lambda *a: None)
    release_model_parallel()
    return hf, ckpt
