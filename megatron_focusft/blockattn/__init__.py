"""Block attention training: block fine-tuning and block distillation (a method package, like
focusft/ and sft/)."""
