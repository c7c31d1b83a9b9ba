"""DiReFT: direct low-rank edits, ``Φ(h) = h + W₂ᵀ act(W₁ h + b)``.

No orthogonality and no ``−Rh`` term: cheaper than LoReFT, comparable to a rank-r LoRA applied
to hidden states. ``W₂`` is ``proj_layer.weight`` (``[r, d]``), ``W₁, b`` are ``learned_source``.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import register_intervention
from .loreft import LowRankIntervention


@register_intervention("direft")
class DireftIntervention(LowRankIntervention):
    """``h + W₂ᵀ act(W₁ h + b)``."""

    def __init__(self, *, add_bias: bool = False, **kwargs) -> None:
        super().__init__(add_bias=bool(add_bias), **kwargs)

    def build_parameters(self) -> None:
        # proj_layer's optional bias is kept for checkpoint compatibility with pyreft; the
        # formula uses only its weight.
        self.proj_layer = nn.Linear(self.embed_dim, self.rank, bias=self.config["add_bias"])
        self.learned_source = nn.Linear(self.embed_dim, self.rank)

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.learned_source.weight.dtype)
        return self.act_fn(self.learned_source(x)) @ self.proj_layer.weight
