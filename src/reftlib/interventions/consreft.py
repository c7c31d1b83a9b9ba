"""ConsReFT: constant low-rank ReFT, ``Φ(h) = h + Rᵀ(b − R h)``.

Sets the projection of ``h`` on the rank-r subspace to a learned constant ``b``.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import register_intervention
from .loreft import LowRankIntervention
from .rotation import OrthonormalRows


@register_intervention("consreft")
class ConsreftIntervention(LowRankIntervention):
    """``h + Rᵀ(b − R h)``, R with orthonormal rows."""

    def build_parameters(self) -> None:
        self.rotate_layer = OrthonormalRows(self.embed_dim, self.rank)
        self.learned_source = nn.Parameter(torch.rand(self.rank))

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.learned_source.dtype)
        rotation = self.rotate_layer.weight.to(x.dtype)
        return (self.learned_source - x @ rotation.T) @ rotation

    @classmethod
    def from_pyreft_state(cls, state, where):
        return cls.pyreft_rotation_and_vector(state, where)
