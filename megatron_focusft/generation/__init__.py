"""Text generation from a trained model (`focusft generate`).

sampling.py  greedy / temperature / top-k / top-p choice of the next token.
decode.py    batched generation with Megatron's static KV cache; `causal` or `focusft` prefill,
             optional fast weights (test-time adaptation).
prompts.py   reading prompts (text, chat messages, token ids) and writing results.
loading.py   a model for inference from a Hugging Face directory or a Megatron checkpoint.
cli.py       the command.
"""
