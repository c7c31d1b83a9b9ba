"""LoFiT step 1: a learned scale for every attention head, ``z ← (1 + A) ⊙ z``.

``A ∈ ℝ^{heads×head_dim}`` starts near zero (``N(0, init_std²)``) so the model starts unchanged.
Trained with an L1 penalty, ``‖A_h‖₂`` ranks the heads that matter for a task.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import HeadIntervention, register_intervention


@register_intervention("head_scale")
class HeadScaleIntervention(HeadIntervention):
    """``z + A ⊙ z`` on ``[..., heads, head_dim]`` attention-head outputs."""

    def __init__(self, *, init_std: float = 1e-3, **kwargs) -> None:
        super().__init__(init_std=float(init_std), **kwargs)

    def build_parameters(self) -> None:
        self.scale = nn.Parameter(torch.randn(self.num_heads, self.head_dim) * self.config["init_std"])

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.scale.to(h.dtype)

    foldable = True

    @torch.no_grad()
    def fold_into(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """``(z ⊙ (1 + A)) @ W = z @ (diag(1 + A) W)``: scale the input rows of the projection."""
        weight *= (1.0 + self.scale.detach().to(weight.dtype)).reshape(-1, 1).to(weight.device)

    def head_scores(self) -> torch.Tensor:
        """``‖A_h‖₂`` per head: LoFiT's importance score."""
        return self.scale.detach().float().norm(dim=-1)
