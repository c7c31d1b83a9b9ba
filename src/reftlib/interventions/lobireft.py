"""LoBiReFT: a low-rank bias, ``Φ(h) = h + Rᵀ b``.

The cheapest ReFT: a learned steering vector constrained to an r-dimensional subspace.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import register_intervention
from .loreft import LowRankIntervention
from .rotation import OrthonormalRows


@register_intervention("lobireft")
class LobireftIntervention(LowRankIntervention):
    """``h + Rᵀ b``, R with orthonormal rows."""

    def build_parameters(self) -> None:
        self.rotate_layer = OrthonormalRows(self.embed_dim, self.rank)
        self.learned_source = nn.Parameter(torch.rand(self.rank))

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        rotation = self.rotate_layer.weight.to(self.learned_source.dtype)
        return (self.learned_source @ rotation).to(h.dtype).expand_as(h)

    @classmethod
    def from_pyreft_state(cls, state, where):
        return cls.pyreft_rotation_and_vector(state, where)
