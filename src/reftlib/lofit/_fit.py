"""One training routine for both LoFiT steps: build the dataset and the trainer, then train.

Both steps use reftlib's ``Trainer`` subclasses; only the trainer class differs (with or without
the L1 term, cross-entropy or DPO), so everything the trainers do (checkpoints, accumulation,
devices, mixed precision) applies to LoFiT unchanged.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainingArguments

from ..errors import ReftConfigError
from ..model import ReftModel
from ..training.dpo import ReftDPODataCollator, ReftDPOTrainer, make_preference_dataset
from ..training.trainer import ReftTrainer, ReftTrainerForCausalLM
from .data import make_sft_dataset, normalize_train_data, resolve_objective


def training_arguments(output_dir: str, *, lr: float, epochs: float, batch_size: int, seed: int,
                       overrides: Mapping[str, Any] | TrainingArguments | None) -> TrainingArguments:
    """LoFiT's defaults (AdamW, linear decay, no weight decay, nothing saved) updated by ``overrides``.

    A ``TrainingArguments`` instance is used as given (``lr``/``epochs``/``batch_size`` are then ignored).
    """
    if isinstance(overrides, TrainingArguments):
        return overrides
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ReftConfigError(
            f"training_args must be a dict of TrainingArguments fields or a TrainingArguments, got {type(overrides).__name__}"
        )
    values: dict[str, Any] = dict(
        output_dir=output_dir, per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
        num_train_epochs=epochs, learning_rate=lr, lr_scheduler_type="linear", weight_decay=0.0,
        save_strategy="no", report_to=[], seed=seed, data_seed=seed, logging_steps=10, dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    values.update(overrides or {})
    return TrainingArguments(**values)


def fit(
    reft_model: ReftModel,
    tokenizer: Any,
    train_data: Any,
    *,
    objective: str | None,
    lr: float,
    epochs: float,
    batch_size: int,
    seed: int,
    beta: float,
    max_length: int | None,
    training_args: Mapping[str, Any] | TrainingArguments | None,
    sft_trainer: type[ReftTrainer] = ReftTrainerForCausalLM,
    dpo_trainer: type[ReftDPOTrainer] = ReftDPOTrainer,
    trainer_kwargs: Mapping[str, Any] | None = None,
    eval_data: Any = None,
) -> ReftTrainer:
    """Train ``reft_model``'s interventions (at every position) on ``train_data``; return the trainer.

    The loss comes from :func:`~reftlib.lofit.data.resolve_objective`. DPO reference
    log-probabilities are precomputed once (exact: the base model is frozen).
    """
    if tokenizer is None:
        raise ReftConfigError("a tokenizer is needed to build the training examples; pass tokenizer=")
    kind, rows = normalize_train_data(train_data)
    chosen = resolve_objective(kind, objective)
    base = reft_model.model
    if chosen == "dpo":
        build = lambda data: make_preference_dataset(tokenizer, data, max_length=max_length, model=base)  # noqa: E731
    else:
        build = lambda data: make_sft_dataset(tokenizer, data, max_length=max_length, model=base)  # noqa: E731
    train_dataset = build(rows)
    eval_dataset = None
    if eval_data is not None:
        eval_kind, eval_rows = normalize_train_data(eval_data)
        resolve_objective(eval_kind, chosen)
        eval_dataset = build(eval_rows)
    with tempfile.TemporaryDirectory(prefix="reftlib-lofit-") as tmp:
        args = training_arguments(tmp, lr=lr, epochs=epochs, batch_size=batch_size, seed=seed,
                                  overrides=training_args)
        common = dict(model=reft_model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      processing_class=tokenizer, **(trainer_kwargs or {}))
        if chosen == "dpo":
            trainer = dpo_trainer(data_collator=ReftDPODataCollator(tokenizer=tokenizer), beta=beta,
                                  precompute_reference=True, **common)
        else:
            trainer = sft_trainer(**common)
        trainer.train()
    reft_model.eval()
    return trainer
