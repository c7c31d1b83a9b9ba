"""DiReFT: direct low-rank edits, ``Φ(h) = h + Rᵀ act(W h + b)``.

No ``−Rh`` term: the edit is written into the rank-r subspace spanned by R's rows without
first removing what is there. As in pyreft's implementation R keeps orthonormal rows
(computed in fp32); :class:`~reftlib.NodireftIntervention` drops that constraint too.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import register_intervention
from .loreft import LowRankIntervention
from .pyreft_state import rotation_from_pyreft
from .rotation import OrthonormalRows


@register_intervention("direft")
class DireftIntervention(LowRankIntervention):
    """``h + Rᵀ act(W h + b)``, R with orthonormal rows."""

    def build_parameters(self) -> None:
        self.rotate_layer = OrthonormalRows(self.embed_dim, self.rank)
        self.learned_source = nn.Linear(self.embed_dim, self.rank)

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.learned_source.weight.dtype)
        return self.act_fn(self.learned_source(x)) @ self.rotate_layer.weight.to(x.dtype)

    @classmethod
    def from_pyreft_state(cls, state, where):
        """pyreft's DiReFT: the rotation plus ``learned_source`` (``W``, ``b``)."""
        raw, used, embed_dim, rank = rotation_from_pyreft(state, where)
        params = {"rotate_layer.raw": raw, **cls.pyreft_linear_source(state, "learned_source.", where)}
        return params, {"embed_dim": embed_dim, "low_rank_dimension": rank, "act_fn": "linear"}, \
            used | {"learned_source.weight", "learned_source.bias"}
