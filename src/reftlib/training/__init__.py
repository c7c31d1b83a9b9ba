"""Training ReFT interventions: data modules, a collator and ``transformers.Trainer`` subclasses.

Typical use (pyreft's names)::

    from reftlib.training import ReftTrainerForCausalLM, make_last_position_supervised_data_module

    data_module = make_last_position_supervised_data_module(tokenizer, model, prompts, answers)
    trainer = ReftTrainerForCausalLM(model=reft_model, tokenizer=tokenizer, args=training_args, **data_module)
    trainer.train()
    reft_model.save_pretrained("out")

See :mod:`reftlib.training.data` for how examples and positions are built,
:mod:`reftlib.training.collator` for how they are padded into batches,
:mod:`reftlib.training.trainer` for what the trainers change, and
:mod:`reftlib.training.classification` for sequence classification with a trainable head, and
:mod:`reftlib.training.dpo` for preference optimization (DPO) of any intervention.
"""

from .classification import (
    ReftClassificationHead,
    ReftModelForSequenceClassification,
    classification_loss,
    default_pooling,
    get_reft_model_for_sequence_classification,
)
from .data import (
    IGNORE_INDEX,
    ReftDataCollator,
    apply_chat_template,
    default_max_length,
    make_classification_data_module,
    make_last_position_supervised_data_module,
    make_multiple_position_supervised_data_module,
    make_supervised_examples,
    split_position_spec,
)
from .dpo import (
    AdapterDPOTrainer,
    ReftDPODataCollator,
    ReftDPOTrainer,
    dpo_loss,
    make_preference_data_module,
    make_preference_dataset,
    sequence_logps,
)
from .prefix_cache import PrefixCache
from .trainer import (
    ReftTrainer,
    ReftTrainerForCausalLM,
    ReftTrainerForSequenceClassification,
    load_intervention_weights,
    refresh_intervention_caches,
)

__all__ = [
    "IGNORE_INDEX",
    "AdapterDPOTrainer",
    "PrefixCache",
    "ReftClassificationHead",
    "ReftDPODataCollator",
    "ReftDPOTrainer",
    "ReftDataCollator",
    "ReftModelForSequenceClassification",
    "ReftTrainer",
    "ReftTrainerForCausalLM",
    "ReftTrainerForSequenceClassification",
    "apply_chat_template",
    "classification_loss",
    "default_max_length",
    "default_pooling",
    "dpo_loss",
    "get_reft_model_for_sequence_classification",
    "load_intervention_weights",
    "make_classification_data_module",
    "make_last_position_supervised_data_module",
    "make_multiple_position_supervised_data_module",
    "make_preference_data_module",
    "make_preference_dataset",
    "make_supervised_examples",
    "refresh_intervention_caches",
    "sequence_logps",
    "split_position_spec",
]
