"""LoFiT step 2: a learned offset on selected attention heads, ``z_h ← z_h + v_h``.

Only the heads in ``heads`` get a parameter row; every other head is untouched. Applied at
every position, the offset folds exactly into the output projection's bias (see
:meth:`reftlib.ReftModel.merge_and_unload`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ReftConfigError
from .base import HeadIntervention, register_intervention


@register_intervention("head_bias")
class HeadBiasIntervention(HeadIntervention):
    """``z[..., h, :] + v_h`` for each selected head ``h`` (all heads when ``heads`` is None)."""

    def __init__(self, *, heads: Sequence[int] | None = None, init_std: float = 1e-3, **kwargs) -> None:
        if heads is not None:
            heads = [int(h) for h in heads]
            if len(set(heads)) != len(heads):
                raise ReftConfigError(f"heads contains duplicates: {heads}; list each head once")
        super().__init__(heads=heads, init_std=float(init_std), **kwargs)

    def build_parameters(self) -> None:
        heads = self.config["heads"]
        if heads is None:
            heads = list(range(self.num_heads))
            self.config["heads"] = heads
        bad = [h for h in heads if not 0 <= h < self.num_heads]
        if bad:
            raise ReftConfigError(
                f"heads {bad} do not exist: this layer has {self.num_heads} heads (valid 0..{self.num_heads - 1})"
            )
        self.register_buffer("head_index", torch.tensor(heads, dtype=torch.long), persistent=False)
        self.bias = nn.Parameter(torch.randn(len(heads), self.head_dim) * self.config["init_std"])

    @property
    def heads(self) -> list[int]:
        return list(self.config["heads"] or [])

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        offsets = h.new_zeros(h.shape[-2:])
        offsets = offsets.index_copy(0, self.head_index, self.bias.to(h.dtype))
        return offsets.expand_as(h)

    foldable = True

    @torch.no_grad()
    def fold_into(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """``(z + v) @ W + b = z @ W + (b + v @ W)``: the offsets move into the projection's bias."""
        offsets = weight.new_zeros(self.num_heads, self.head_dim)
        offsets[self.head_index.to(weight.device)] = self.bias.detach().to(weight.device, weight.dtype)
        bias += offsets.reshape(-1) @ weight
