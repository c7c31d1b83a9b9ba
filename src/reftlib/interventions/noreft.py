"""NoReFT: LoReFT without the orthogonality constraint.

``Φ(h) = h + Pᵀ(act(W h + b) − P h)`` with an unconstrained ``P ∈ ℝ^{r×d}`` (``proj_layer``).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import register_intervention
from .loreft import LowRankIntervention


@register_intervention("noreft")
class NoreftIntervention(LowRankIntervention):
    """``h + Pᵀ(act(W h + b) − (P h + c))``; ``c`` exists only with ``add_bias=True``."""

    def __init__(self, *, add_bias: bool = False, **kwargs) -> None:
        super().__init__(add_bias=bool(add_bias), **kwargs)

    def build_parameters(self) -> None:
        self.proj_layer = nn.Linear(self.embed_dim, self.rank, bias=self.config["add_bias"])
        self.learned_source = nn.Linear(self.embed_dim, self.rank)

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.learned_source.weight.dtype)
        return (self.act_fn(self.learned_source(x)) - self.proj_layer(x)) @ self.proj_layer.weight

    @classmethod
    def from_pyreft_state(cls, state, where):
        return cls.pyreft_projection(state, where)
