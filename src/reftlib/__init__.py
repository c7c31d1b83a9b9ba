"""reftlib: representation fine-tuning (ReFT) and LoFiT for any Hugging Face model, through hooks."""

from .collect import Activations, collect_activations, load_activations
from .components import (
    COMPONENT_OVERRIDES,
    COMPONENTS,
    describe_structure,
    register_component_override,
    resolve_site,
)
from .config import ReftConfig, RepresentationConfig
from .distributed import gather_reft_state_dict, load_sharded_intervention_weights, shard_reft_model
from .errors import (
    AdapterError,
    ArchitectureError,
    ArgumentTypeError,
    CheckpointError,
    DeviceError,
    InputError,
    MergeError,
    MissingDependencyError,
    NumericalError,
    PositionError,
    ReftConfigError,
    ReftError,
    RequestRefusedError,
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
    SteeringVectorIntervention,
    register_intervention,
    registered_interventions,
)
from .io import get_adapter_state_dict, set_adapter_state_dict
from .model import ReftModel, get_reft_model
from .positions import last_position, parse_position_spec, resolve_position_spec, split_position_spec

__version__ = "0.1.0"

# Training names are importable from the top level too, loaded on first use (transformers.Trainer is
# heavy): ``reftlib.ReftTrainerForCausalLM`` imports reftlib.training then. They are listed in
# ``__all__`` and ``dir(reftlib)`` like the names imported above.
_TRAINING_NAMES = (
    "ReftClassificationHead",
    "ReftDPOTrainer",
    "ReftDataCollator",
    "ReftModelForSequenceClassification",
    "ReftTrainer",
    "ReftTrainerForCausalLM",
    "ReftTrainerForSequenceClassification",
    "apply_chat_template",
    "get_reft_model_for_sequence_classification",
    "make_classification_data_module",
    "make_last_position_supervised_data_module",
    "make_multiple_position_supervised_data_module",
    "make_preference_data_module",
    "make_supervised_examples",
)


def __getattr__(name: str):
    if name in _TRAINING_NAMES:
        from . import training

        return getattr(training, name)
    raise AttributeError(f"module 'reftlib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_TRAINING_NAMES))


__all__ = [
    "COMPONENTS",
    "COMPONENT_OVERRIDES",
    "Activations",
    "AdapterError",
    "ArchitectureError",
    "ArgumentTypeError",
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
    "MergeError",
    "MissingDependencyError",
    "NodireftIntervention",
    "NoreftIntervention",
    "NumericalError",
    "PositionError",
    "ReftClassificationHead",
    "ReftConfig",
    "ReftConfigError",
    "ReftDPOTrainer",
    "ReftDataCollator",
    "ReftError",
    "ReftModel",
    "ReftModelForSequenceClassification",
    "ReftTrainer",
    "ReftTrainerForCausalLM",
    "ReftTrainerForSequenceClassification",
    "RepresentationConfig",
    "RequestRefusedError",
    "SteeringVectorIntervention",
    "apply_chat_template",
    "collect_activations",
    "describe_structure",
    "gather_reft_state_dict",
    "get_adapter_state_dict",
    "get_reft_model",
    "get_reft_model_for_sequence_classification",
    "last_position",
    "load_activations",
    "load_sharded_intervention_weights",
    "make_classification_data_module",
    "make_last_position_supervised_data_module",
    "make_multiple_position_supervised_data_module",
    "make_preference_data_module",
    "make_supervised_examples",
    "parse_position_spec",
    "register_component_override",
    "register_intervention",
    "registered_interventions",
    "resolve_position_spec",
    "resolve_site",
    "set_adapter_state_dict",
    "shard_reft_model",
    "split_position_spec",
]
