"""reftlib: representation fine-tuning (ReFT) and LoFiT for any Hugging Face model, through hooks."""

from .components import COMPONENT_OVERRIDES, describe_structure, register_component_override, resolve_site
from .config import COMPONENTS, ReftConfig, RepresentationConfig
from .errors import (
    AdapterError,
    ArchitectureError,
    CheckpointError,
    InputError,
    NumericalError,
    PositionError,
    ReftConfigError,
    ReftError,
)
from .interventions import (
    ConsreftIntervention,
    DireftIntervention,
    HeadBiasIntervention,
    HeadIntervention,
    HeadScaleIntervention,
    Intervention,
    LobireftIntervention,
    LoreftIntervention,
    NodireftIntervention,
    NoreftIntervention,
    register_intervention,
    registered_interventions,
)
from .model import ReftModel, get_reft_model
from .positions import last_position, parse_position_spec, resolve_position_spec

__version__ = "0.1.0"

__all__ = [
    "COMPONENTS",
    "COMPONENT_OVERRIDES",
    "AdapterError",
    "ArchitectureError",
    "CheckpointError",
    "ConsreftIntervention",
    "DireftIntervention",
    "HeadBiasIntervention",
    "HeadIntervention",
    "HeadScaleIntervention",
    "InputError",
    "Intervention",
    "LobireftIntervention",
    "LoreftIntervention",
    "NodireftIntervention",
    "NoreftIntervention",
    "NumericalError",
    "PositionError",
    "ReftConfig",
    "ReftConfigError",
    "ReftError",
    "ReftModel",
    "RepresentationConfig",
    "describe_structure",
    "get_reft_model",
    "last_position",
    "parse_position_spec",
    "register_component_override",
    "register_intervention",
    "registered_interventions",
    "resolve_position_spec",
    "resolve_site",
]
