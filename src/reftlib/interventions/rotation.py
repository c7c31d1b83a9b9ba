"""A low-rank matrix with orthonormal rows, parametrized in fp32.

``R ∈ ℝ^{r×d}`` is stored as an unconstrained ``d×r`` parameter ``raw`` and orthonormalized by a
QR decomposition on every access that needs gradients (``R = Qᵀ``, with signs fixed so that
the map is smooth and ``raw``'s normalized columns are returned when they are already
orthogonal). Only ``d×r`` numbers are stored and saved, never a ``d×d`` basis, and the
decomposition always runs in fp32 because QR has no half-precision kernels. A forward pass
computes it once per intervention (one ``d×r`` QR, microseconds); without gradients (inference,
generation) the result is cached until ``raw`` changes, so decode steps never recompute it.

R does not depend on the length of ``raw``'s columns, but the optimizer's step size in R does:
Adam moves every entry of ``raw`` by about ``lr`` per step, which turns R by about
``lr·√d / ‖column‖``. ``raw`` therefore starts (and is loaded by :meth:`OrthonormalRows.set_weight`)
with columns of length :data:`INIT_COLUMN_NORM` = 1/2, which gives the same first-order gain as
pyreft's Householder parametrization (``dQ ≈ 2·dA``). After every optimizer step that updated it,
``raw`` is retracted to orthonormal columns of that length (R unchanged, see
:meth:`OrthonormalRows.retract`), so the step size in R stays the same during training
(``benchmarks/emoji_training.py`` compares the resulting losses with pyreft's).
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

# Fused optimizers update parameters without bumping ``Tensor._version``, so the no-grad cache
# is also keyed on a global counter advanced after every optimizer step.
_optimizer_steps = itertools.count()
_step = [0]


#: Every live :class:`OrthonormalRows`, so that optimizer steps can retract the ones they updated.
_live: weakref.WeakSet = weakref.WeakSet()


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    _step[0] = next(_optimizer_steps)
    if not _live:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for module in list(_live):
        raw = module.raw
        if id(raw) in stepped and raw.grad is not None:
            module.retract()


register_optimizer_step_post_hook(_after_optimizer_step)

#: Length of ``raw``'s columns at initialization and after :meth:`OrthonormalRows.set_weight`
#: (see the module notes: it sets how fast optimizers turn R, not R itself).
INIT_COLUMN_NORM = 0.5


class OrthonormalRows(nn.Module):
    """``weight`` is a ``[r, d]`` matrix whose rows are orthonormal (``R Rᵀ = I``)."""

    def __init__(self, embed_dim: int, rank: int) -> None:
        super().__init__()
        raw = torch.empty(embed_dim, rank, dtype=torch.float32)
        nn.init.orthogonal_(raw, gain=INIT_COLUMN_NORM)
        self.raw = nn.Parameter(raw)
        self._cache: tuple[tuple, torch.Tensor] | None = None
        _live.add(self)

    @property
    def weight(self) -> torch.Tensor:
        """The orthonormalized ``[r, d]`` matrix R, in fp32."""
        raw = self.raw
        if torch.is_grad_enabled() and raw.requires_grad:
            return _orthonormalize(raw)
        key = (raw.data_ptr(), raw._version, _step[0], raw.device, raw.dtype)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, _orthonormalize(raw))
        return self._cache[1]

    @torch.no_grad()
    def set_weight(self, rows: torch.Tensor) -> None:
        """Load an ``[r, d]`` matrix with orthonormal rows (e.g. a rotation saved by pyreft).

        ``weight`` then returns ``rows``; ``raw`` holds them with columns of length
        :data:`INIT_COLUMN_NORM`, so further training moves R as a freshly initialized one would.
        """
        self.raw.copy_(rows.detach().to(self.raw.dtype).T * INIT_COLUMN_NORM)

    @torch.no_grad()
    def retract(self) -> None:
        """Put ``raw`` back on orthonormal columns of length :data:`INIT_COLUMN_NORM`; R is unchanged.

        Called after every optimizer step that updated ``raw``. The gradient of a QR
        parametrization is orthogonal to ``raw``'s columns, so optimizer steps make them longer
        and longer, and R's effective learning rate (``∝ lr / ‖column‖``) decays during training;
        weight decay does the opposite. Retracting keeps the step size in R constant, like
        pyreft's Householder parametrization (emoji tutorial, 100 steps: loss 0.99 without, see
        ``benchmarks/emoji_training.py`` for the figure with it).
        """
        raw = self.raw
        raw.copy_(_orthonormalize(raw).T.to(raw.dtype) * INIT_COLUMN_NORM)

    def extra_repr(self) -> str:
        d, r = self.raw.shape
        return f"rank={r}, embed_dim={d}"


def _orthonormalize(raw: torch.Tensor) -> torch.Tensor:
    q, r = torch.linalg.qr(raw.float(), mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return (q * signs).T
