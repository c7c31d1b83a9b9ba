"""LoReFT: low-rank linear subspace ReFT (Wu et al., 2024).

``Φ(h) = h + Rᵀ(act(W h + b) − R h)`` with ``R ∈ ℝ^{r×d}`` having orthonormal rows and
``W ∈ ℝ^{r×d}, b ∈ ℝ^r``. It replaces the projection of ``h`` onto the rank-r subspace spanned
by R's rows with a learned linear function of ``h``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..errors import ReftConfigError
from .base import Intervention, register_intervention
from .rotation import OrthonormalRows


def check_rank(low_rank_dimension: int | None) -> int:
    if low_rank_dimension is None:
        raise ReftConfigError("low_rank_dimension is required (the rank r of the intervention, e.g. 4)")
    if int(low_rank_dimension) < 1:
        raise ReftConfigError(f"low_rank_dimension must be a positive integer, got {low_rank_dimension}")
    return int(low_rank_dimension)


def activation(name: str | None):
    name = name or "linear"
    if name not in ACT2FN:
        raise ReftConfigError(f"unknown act_fn {name!r}; use one of {sorted(ACT2FN)}")
    return ACT2FN[name]


class LowRankIntervention(Intervention):
    """Shared plumbing for rank-r interventions: rank validation and the activation."""

    def __init__(self, *, low_rank_dimension: int | None = None, act_fn: str | None = None, **kwargs) -> None:
        check_rank(low_rank_dimension)
        activation(act_fn)
        super().__init__(low_rank_dimension=int(low_rank_dimension), act_fn=act_fn or "linear", **kwargs)

    @property
    def rank(self) -> int:
        return self.config["low_rank_dimension"]

    @property
    def act_fn(self):
        return activation(self.config["act_fn"])

    def build(self, embed_dim: int, num_heads: int | None = None, head_dim: int | None = None) -> None:
        if self.rank > embed_dim:
            raise ReftConfigError(
                f"low_rank_dimension={self.rank} is larger than the site's width {embed_dim}; "
                f"use a rank between 1 and {embed_dim}"
            )
        super().build(embed_dim)


@register_intervention("loreft")
class LoreftIntervention(LowRankIntervention):
    """``h + Rᵀ(act(W h + b) − R h)``, R with orthonormal rows (computed in fp32)."""

    def build_parameters(self) -> None:
        self.rotate_layer = OrthonormalRows(self.embed_dim, self.rank)
        self.learned_source = nn.Linear(self.embed_dim, self.rank)

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.learned_source.weight.dtype)
        rotation = self.rotate_layer.weight.to(x.dtype)
        return (self.act_fn(self.learned_source(x)) - x @ rotation.T) @ rotation
