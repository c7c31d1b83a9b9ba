"""LoReFT: low-rank linear subspace ReFT (Wu et al., 2024).

``Φ(h) = h + Rᵀ(act(W h + b) − R h)`` with ``R ∈ ℝ^{r×d}`` having orthonormal rows and
``W ∈ ℝ^{r×d}, b ∈ ℝ^r``. It replaces the projection of ``h`` onto the rank-r subspace spanned
by R's rows with a learned linear function of ``h``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..errors import ReftConfigError
from .base import Intervention, register_intervention
from .pyreft_state import require_tensor, rotation_from_pyreft
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

    @staticmethod
    def pyreft_linear_source(state: Mapping[str, torch.Tensor], prefix: str, where: object) -> dict[str, torch.Tensor]:
        """pyreft's ``W``/``b`` (``<prefix>weight``, ``<prefix>bias``) as ``learned_source.weight``/``.bias``."""
        return {"learned_source.weight": require_tensor(state, f"{prefix}weight", where),
                "learned_source.bias": require_tensor(state, f"{prefix}bias", where)}

    @classmethod
    def pyreft_rotation_and_vector(cls, state: Mapping[str, torch.Tensor], where: object):
        """ConsReFT / LoBiReFT: the rotation plus the learned vector ``b`` (``learned_source``)."""
        raw, used, embed_dim, rank = rotation_from_pyreft(state, where)
        params = {"rotate_layer.raw": raw, "learned_source": require_tensor(state, "learned_source", where)}
        return params, {"embed_dim": embed_dim, "low_rank_dimension": rank}, used | {"learned_source"}

    @classmethod
    def pyreft_projection(cls, state: Mapping[str, torch.Tensor], where: object):
        """NoReFT / NodiReFT: the unconstrained ``P`` (``proj_layer``, bias optional) plus ``W``, ``b``."""
        params = {"proj_layer.weight": require_tensor(state, "proj_layer.weight", where)}
        if "proj_layer.bias" in state:
            params["proj_layer.bias"] = state["proj_layer.bias"]
        params.update(cls.pyreft_linear_source(state, "learned_source.", where))
        rank, embed_dim = params["proj_layer.weight"].shape
        arguments = {"embed_dim": int(embed_dim), "low_rank_dimension": int(rank), "act_fn": "linear",
                     "add_bias": "proj_layer.bias" in params}
        return params, arguments, {"proj_layer.weight", "proj_layer.bias", "learned_source.weight", "learned_source.bias"}

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

    @classmethod
    def from_pyreft_state(cls, state, where):
        """pyreft's LoReFT: the rotation plus ``W``, ``b`` (top-level in pyreft's compact save)."""
        raw, used, embed_dim, rank = rotation_from_pyreft(state, where)
        prefix = "" if "weight" in state else "learned_source."
        params = {"rotate_layer.raw": raw, **cls.pyreft_linear_source(state, prefix, where)}
        return params, {"embed_dim": embed_dim, "low_rank_dimension": rank, "act_fn": "linear"}, \
            used | {f"{prefix}weight", f"{prefix}bias"}
