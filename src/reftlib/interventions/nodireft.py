"""NodiReFT: DiReFT without any cast or constraint, ``Φ(h) = h + W₂ᵀ act(W₁ h + b)``.

Kept as its own type for compatibility with pyreft checkpoints and experiments; it computes
in the intervention's dtype exactly as DiReFT does.
"""

from __future__ import annotations

from .base import register_intervention
from .direft import DireftIntervention


@register_intervention("nodireft")
class NodireftIntervention(DireftIntervention):
    """``h + W₂ᵀ act(W₁ h + b)`` (same math as :class:`DireftIntervention`)."""
