"""Intervention types. Each lives in its own short module and registers itself by name."""

from .base import (
    HeadIntervention,
    Intervention,
    intervention_class,
    register_intervention,
    registered_interventions,
)
from .consreft import ConsreftIntervention
from .direft import DireftIntervention
from .head_bias import HeadBiasIntervention
from .head_scale import HeadScaleIntervention
from .lobireft import LobireftIntervention
from .loreft import LoreftIntervention
from .nodireft import NodireftIntervention
from .noreft import NoreftIntervention
from .rotation import OrthonormalRows
from .steering import SteeringVectorIntervention

__all__ = [
    "ConsreftIntervention",
    "DireftIntervention",
    "HeadBiasIntervention",
    "HeadIntervention",
    "HeadScaleIntervention",
    "Intervention",
    "LobireftIntervention",
    "LoreftIntervention",
    "NodireftIntervention",
    "NoreftIntervention",
    "OrthonormalRows",
    "SteeringVectorIntervention",
    "intervention_class",
    "register_intervention",
    "registered_interventions",
]
