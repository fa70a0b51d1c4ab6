"""Per-position losses from logits, shared by SAE evaluation and steering evaluation.

A module of its own, so that a stage that only needs these two numbers (steering) does
not run, and depend on, the SAE evaluation code.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ce_full(logits: Tensor, target: Tensor) -> Tensor:
    """Per-prediction cross-entropy from logits [..., vocab] and targets [...] (float64)."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    return -lp.gather(-1, target[..., None]).squeeze(-1)


def kl_divergence(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """KL(p ‖ q) per position from logits [..., vocab] (float64)."""
    lp = torch.log_softmax(logits_p.double(), dim=-1)
    lq = torch.log_softmax(logits_q.double(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)
