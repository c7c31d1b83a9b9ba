"""A low-rank matrix with orthonormal rows, parametrized in fp32.

``R ∈ ℝ^{r×d}`` is stored as an unconstrained ``d×r`` parameter ``raw`` and orthonormalized by a
QR decomposition on every access that needs gradients, with signs fixed so that the map is smooth.
Only ``d×r`` numbers are stored and saved, never a ``d×d`` basis, and the decomposition always
runs in fp32 because QR has no half-precision kernels. A forward pass computes it once per
intervention (one ``d×r`` QR and a length-``d`` FFT per column, microseconds); without gradients
(inference, generation) the result is cached until ``raw`` changes, so decode steps never
recompute it.

**Coordinates.** ``raw`` holds R's rows in a fixed, dense orthonormal basis of ℝ^d rather than
in the hidden state's own coordinates: ``Rᵀ = M·qr(raw)`` with ``M = H·S``, ``S`` a fixed ±1
diagonal and ``H`` the orthonormal discrete Hartley transform (``(Re − Im)(FFT(x))/√d``, its own
inverse). Adam scales every coordinate of ``raw`` separately; the hidden states of language
models have a few dimensions with outsized activations, so in the hidden state's own basis the
gradient of R sits on a few coordinates, and per-coordinate steps of equal size point away from
it. In a dense basis every coordinate sees a mixture and the step follows the gradient (pyreft
gets the same effect from a random ``d×d`` orthogonal base it stores beside each rotation). On
the emoji tutorial this lowers the final loss from 0.72 to 0.48 from the same initial weights
(``benchmarks/emoji_training.py --loss-seeds`` compares with pyreft over seeds). ``M`` costs
``O(d log d)`` per column and nothing to store; files of format version 1 (R's rows in the
hidden state's basis) are converted when read (:func:`raw_from_columns`).

**Step size.** R does not depend on the length of ``raw``'s columns, but the optimizer's step
size in R does: Adam moves every entry of ``raw`` by about ``lr`` per step, which turns R by about
``lr·√d / ‖column‖``. ``raw`` therefore starts (and is loaded by :meth:`OrthonormalRows.set_weight`)
with columns of length :data:`INIT_COLUMN_NORM` = 1/2, which gives the same first-order gain as
pyreft's Householder parametrization (``dQ ≈ 2·dA``). After every optimizer step that updated it,
``raw`` is retracted to orthonormal columns of that length (R unchanged, see
:meth:`OrthonormalRows.retract`), so the step size in R stays the same during training.
"""

from __future__ import annotations

import torch
from torch import nn

from .steps import track

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
        track(self)

    def __setstate__(self, state: dict) -> None:
        """Copies (``copy.deepcopy``, ``Intervention.clone``) are retracted after optimizer steps too."""
        super().__setstate__(state)
        track(self)

    @property
    def weight(self) -> torch.Tensor:
        """The orthonormalized ``[r, d]`` matrix R, in fp32."""
        raw = self.raw
        if torch.is_grad_enabled() and raw.requires_grad:
            return rows_from_raw(raw)
        key = (raw.data_ptr(), raw._version, raw.device, raw.dtype)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, rows_from_raw(raw))
        return self._cache[1]

    @torch.no_grad()
    def set_weight(self, rows: torch.Tensor) -> None:
        """Load an ``[r, d]`` matrix with orthonormal rows (e.g. a rotation saved by pyreft).

        ``weight`` then returns ``rows`` (up to rounding); ``raw`` holds them with columns of length
        :data:`INIT_COLUMN_NORM`, so further training moves R as a freshly initialized one would.
        """
        self.raw.copy_(raw_from_columns(rows.detach().T) * INIT_COLUMN_NORM)

    def clear_cache(self) -> None:
        """Forget the cached ``R`` (it is recomputed on the next no-grad use)."""
        self._cache = None

    def after_optimizer_step(self) -> None:
        """Retract ``raw`` after a step that updated it (see :mod:`reftlib.interventions.steps`).

        Fused optimizers update ``raw`` without bumping its version counter; retracting writes
        ``raw`` again (which does), and the cache is dropped explicitly as well.
        """
        self.retract()
        self.clear_cache()

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
        if torch.distributed.is_available() and _is_dtensor(raw):  # sharded by FSDP2: the QR needs every row
            from torch.distributed.tensor import distribute_tensor

            columns = _orthonormal_columns(raw.full_tensor()).to(raw.dtype) * INIT_COLUMN_NORM
            raw.copy_(distribute_tensor(columns, raw.device_mesh, raw.placements))
            return
        raw.copy_(_orthonormal_columns(raw).to(raw.dtype) * INIT_COLUMN_NORM)

    def extra_repr(self) -> str:
        d, r = self.raw.shape
        return f"rank={r}, embed_dim={d}"


def _orthonormal_columns(raw: torch.Tensor) -> torch.Tensor:
    """``qr(raw)``'s ``Q`` (``d×r``, fp32) with signs fixed by the diagonal of ``R``."""
    q, r = torch.linalg.qr(raw.float(), mode="reduced")
    signs = torch.sign(torch.diagonal(r))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs


def _is_dtensor(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def rows_from_raw(raw: torch.Tensor) -> torch.Tensor:
    """The ``[r, d]`` matrix R with orthonormal rows that ``raw`` (``[d, r]``, mixed basis) stands for."""
    return _hartley(_orthonormal_columns(raw) * _signs(raw.shape[0], raw.device)).T


def raw_from_columns(columns: torch.Tensor) -> torch.Tensor:
    """``raw`` (mixed basis, fp32) for ``[d, r]`` columns given in the hidden state's basis (``Mᵀ·columns``)."""
    columns = columns.float()
    return _hartley(columns) * _signs(columns.shape[0], columns.device)


def _hartley(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal discrete Hartley transform along dimension 0 (symmetric and its own inverse)."""
    spectrum = torch.fft.fft(x, dim=0)
    return (spectrum.real - spectrum.imag) * x.shape[0] ** -0.5


_SIGNS: dict[tuple[int, torch.device], torch.Tensor] = {}


def _signs(dim: int, device: torch.device) -> torch.Tensor:
    """A fixed ±1 column of length ``dim`` (integer hash of the index: the same on every machine and version)."""
    key = (dim, device)
    if key not in _SIGNS:
        index = torch.arange(dim, dtype=torch.int64)
        mixed = (index * 0x9E3779B1 + 0x7F4A7C15) & 0xFFFFFFFF
        mixed = ((mixed ^ (mixed >> 15)) * 0x2C1B3C6D) & 0xFFFFFFFF
        mixed = mixed ^ (mixed >> 12)
        _SIGNS[key] = (1.0 - 2.0 * ((mixed >> 7) & 1).float()).unsqueeze(1).to(device)
    return _SIGNS[key]
