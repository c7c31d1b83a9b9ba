"""reftlib: representation fine-tuning (ReFT) and LoFiT for any Hugging Face model, through hooks."""

from .components import COMPONENT_OVERRIDES, describe_structure, register_component_override, resolve_site
from .config import COMPONENTS, ReftConfig, RepresentationConfig
from .errors import (
    AdapterError,
    ArchitectureError,
    CheckpointError,
    DeviceError,
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
from .io import get_adapter_state_dict, set_adapter_state_dict
from .model import ReftModel, get_reft_model
from .positions import last_position, parse_position_spec, resolve_position_spec

__version__ = "0.1.0"

# Training names are importable from the top level too, loaded lazily (transformers.Trainer is heavy).
_TRAINING_NAMES = {
    "ReftTrainer", "ReftTrainerForCausalLM", "ReftTrainerForSequenceClassification", "ReftDataCollator",
    "make_last_position_supervised_data_module", "make_multiple_position_supervised_data_module",
    "make_classification_data_module", "make_supervised_examples", "apply_chat_template",
    "ReftModelForSequenceClassification", "ReftClassificationHead", "get_reft_model_for_sequence_classification",
}


def __getattr__(name: str):
    if name in _TRAINING_NAMES:
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module 'reftlib' has no attribute {name!r}")

__all__ = [
    "COMPONENTS",
    "COMPONENT_OVERRIDES",
    "AdapterError",
    "ArchitectureError",
    "CheckpointError",
    "ConsreftIntervention",
    "DeviceError",
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
    "get_adapter_state_dict",
    "get_reft_model",
    "last_position",
    "parse_position_spec",
    "register_component_override",
    "register_intervention",
    "registered_interventions",
    "resolve_position_spec",
    "resolve_site",
    "set_adapter_state_dict",
]
