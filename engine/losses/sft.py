"""SFT: negative log-likelihood of the completion tokens.

    loss = -sum_i sum_{t in C_i} log pi(y_t | x_i, y_<t) / sum_i |C_i|

C_i is the completion mask (completion tokens incl. the final EOS; never prompt or padding).
These functions return SUMS over the tokens given; the training loop divides by the optimizer
step's total completion-token count (so gradient accumulation weights every token equally).
"""

from __future__ import annotations

import torch


def sft_loss(token_logps: torch.Tensor) -> torch.Tensor:
    """Scalar sum of -token_logps (flat per-token log-probs of completion tokens only)."""
    return -token_logps.sum()
