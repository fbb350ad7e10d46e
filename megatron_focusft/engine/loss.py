"""Token-mean losses in Megatron's (loss_sum, num_tokens, logs) form."""

from __future__ import annotations

import torch


def masked_token_loss(
    per_token_loss: torch.Tensor, loss_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """per_token_loss, loss_mask [b, s] -> (sum of masked losses, token count, logs).

    With `calculate_per_token_loss`, Megatron divides the summed loss by the summed token count
    across micro-batches and data-parallel ranks, so the result is a token mean. logs["lm loss"]
    holds [loss_sum, num_tokens] for reporting.
    """
    loss_mask = loss_mask.to(per_token_loss.dtype)
    loss_sum = (per_token_loss.float() * loss_mask).sum()
    num_tokens = loss_mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num_tokens.float()])
    return loss_sum, num_tokens, {"lm loss": report}
