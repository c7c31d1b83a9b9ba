"""A steering vector: ``h ← h + v``, the same vector added wherever the intervention acts.

This is the intervention behind activation addition and RepE-style reading vectors
(:mod:`reftlib.lofit.repe`): ``v`` is computed from the model's activations (a difference of
means, a principal component) or trained like any other intervention. On a ``"pos"`` site
(``block_output``, ``attention_output``, ...) with ``positions=None`` it acts on every token,
generated ones included.

``trainable=False`` keeps ``v`` as a saved buffer instead of a parameter: it is stored, loaded and
moved like a parameter, but no optimizer, ``set_adapter`` or ``is_trainable=True`` load can make
it trainable (those switch ``requires_grad`` on every parameter of an adapter).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ReftConfigError
from .base import Intervention, register_intervention


@register_intervention("steering_vector")
class SteeringVectorIntervention(Intervention):
    """``h + v`` with one vector ``v`` of the site's width (``init_std=0``: starts at zero, no change)."""

    def __init__(self, *, trainable: bool = True, init_std: float = 0.0, **kwargs) -> None:
        super().__init__(trainable=bool(trainable), init_std=float(init_std), **kwargs)

    def build_parameters(self) -> None:
        std = self.config["init_std"]
        init = torch.randn(self.embed_dim) * std if std else torch.zeros(self.embed_dim)
        if self.config["trainable"]:
            self.vector = nn.Parameter(init)
        else:
            self.register_buffer("vector", init)  # saved with the adapter, never trained

    @property
    def trainable(self) -> bool:
        """Whether ``vector`` is a parameter (``True``) or a frozen buffer (``False``)."""
        return bool(self.config["trainable"])

    @torch.no_grad()
    def set_vector(self, vector: torch.Tensor) -> None:
        """Copy ``vector`` (``[embed_dim]``, any float dtype and device) into ``v``."""
        if not self.is_built:
            raise ReftConfigError(
                "SteeringVectorIntervention.set_vector: the intervention has no width yet; create it with "
                "embed_dim=... or attach it to a model first"
            )
        vector = torch.as_tensor(vector)
        if tuple(vector.shape) != tuple(self.vector.shape):
            raise ReftConfigError(
                f"SteeringVectorIntervention.set_vector: got a vector of shape {tuple(vector.shape)} for a site "
                f"of width {self.embed_dim}; pass a 1-D tensor of {self.embed_dim} values"
            )
        self.vector.copy_(vector.to(self.vector.device, self.vector.dtype))

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        return self.vector.to(h.dtype).expand_as(h)
