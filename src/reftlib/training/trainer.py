"""``transformers.Trainer`` subclasses that train the interventions of a :class:`~reftlib.ReftModel`.

What they change compared with a plain ``Trainer``:

* **Inputs.** Batches carry ``intervention_locations`` (``[batch, n_interventions, n_positions]``,
  ``-1`` = padding) next to ``input_ids``/``attention_mask``/``labels``. The column is kept with
  the default ``remove_unused_columns=True`` (the signature columns are those of the ReftModel
  *and* of the base model), is left on the CPU where reftlib reads it (the hooks copy it to the
  device once per call, without a host synchronization; under CUDA DDP, DDP itself moves all
  inputs to the GPU), and the default collator is :class:`ReftDataCollator`.
  ``tokenizer=`` (pyreft style) is accepted as an alias of ``processing_class=``.
* **Loss.** :class:`ReftTrainerForCausalLM` computes the next-token cross-entropy itself (fp32)
  and divides the summed loss by ``num_items_in_batch`` (the supervised tokens of the whole
  accumulated batch, gathered across processes), exactly as Hugging Face normalizes causal-LM
  losses, so gradient accumulation and DDP give the gradient of the full batch.
  The LM head runs only on the trailing positions that hold supervised tokens
  (``logits_to_keep``, read from the CPU labels; same loss, less compute and memory).
  :class:`ReftTrainerForSequenceClassification` does the same with one item per label.
  :class:`ReftTrainer` keeps the model's own loss (the base model's, when labels are given).
* **Checkpoints.** ``save_model`` and every ``checkpoint-N`` folder hold the reftlib files
  (``reft_config.json`` + ``reft_model.safetensors``, written by ``reft_model.save_pretrained``)
  and the tokenizer, never the base model's weights; when the base is a ``peft.PeftModel`` whose
  LoRA weights train too, they go to ``lora/`` beside them. Only the main process writes
  (``args.should_save``). ``resume_from_checkpoint`` and ``load_best_model_at_end`` load the saved
  tensors back into the existing interventions and LoRA weights (same parameter objects, so the
  optimizer state restored by the Trainer applies to them).
* **Weight decay.** Intervention weights (``learned_source.weight``, ``rotate_layer.raw``, …) decay;
  parameters named ``bias`` do not, whatever the intervention or adapter is called.

* **Frozen prefix skipped.** From the second time a batch's examples are seen, the layers below
  the lowest intervention are not run again: their outputs were recorded the first time
  (``prefix_cache="auto"``, see :mod:`reftlib.training.prefix_cache`; same loss and gradients, a
  quarter less time per step for an intervention at the middle layer). ``trainer.prefix_cache``
  reports hits and misses; ``prefix_cache=False`` turns it off, ``True`` makes an uncacheable
  model an error.

* **Interventions after each step.** Every optimizer step that updates an intervention calls its
  ``after_optimizer_step()`` (:mod:`reftlib.interventions.steps`; the same in a hand-written loop):
  LoReFT's rotation is retracted and its no-grad cache dropped, also under the Trainer's default
  fused AdamW, which does not bump the parameters' version counters.

Gradient checkpointing (``TrainingArguments(gradient_checkpointing=True)`` or
``reft_model.gradient_checkpointing_enable()``) works: reftlib keeps each call's positions for the
recomputation. Mixed precision follows ``args.bf16``/``args.fp16`` (autocast); LoReFT rotations
are always computed in fp32.

FSDP2 (``TrainingArguments(fsdp="full_shard", fsdp_config={"version": 2, ...})``) shards the
frozen base model; the prefix cache turns itself off then (logged). FSDP1 is refused. On the CPU,
accelerate enables FSDP for GPU-like backends only: shard with :func:`reftlib.shard_reft_model`
and a hand-written loop there (see ``docs/distributed.md``).

DeepSpeed ZeRO (``TrainingArguments(deepspeed=config)``, stages 1-3) works too: after each
optimizer step the trainer runs the interventions' post-step updates on their gathered parameters
and DeepSpeed's fp32 master copies (:func:`reftlib.distributed.after_deepspeed_step`); under
ZeRO-3 the prefix cache turns itself off (logged).
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..checks import require_instance, require_processing_class, require_reft_model, unwrap_model
from ..distributed import (
    after_deepspeed_step,
    check_trainer_fsdp,
    is_sharded,
    load_sharded_intervention_weights,
)
from ..errors import CheckpointError, ReftConfigError
from ..hooks import to_device
from ..interventions.rotation import OrthonormalRows
from ..io import load_weights_in_place
from ..model import ReftModel
from ..peft_utils import find_peft_model
from ..runtime import innermost_model
from .classification import ReftModelForSequenceClassification, classification_loss
from .data import IGNORE_INDEX, ReftDataCollator
from .prefix_cache import PrefixCache

__all__ = [
    "ReftTrainer",
    "ReftTrainerForCausalLM",
    "ReftTrainerForSequenceClassification",
    "load_intervention_weights",
    "refresh_intervention_caches",
]

TRAINING_ARGS_NAME = "training_args.bin"
LORA_SUBFOLDER = "lora"  # LoRA weights next to the interventions when a PeftModel is trained too
_KEEP_ON_CPU = ("intervention_locations",)

logger = logging.getLogger(__name__)


def load_intervention_weights(reft_model: ReftModel, folder: str | os.PathLike) -> None:
    """Copy the tensors saved in ``folder`` into ``reft_model``'s existing adapters (in place).

    Unlike :meth:`ReftModel.from_pretrained` this adds nothing: every adapter of the model that the
    folder holds is overwritten, parameter objects are kept (so optimizers still point at them),
    and the extra state (e.g. a classification head) is restored. The index and every config are
    version-checked (see :func:`reftlib.io.load_weights_in_place`).
    """
    load_weights_in_place(reft_model, folder)


def refresh_intervention_caches(model: nn.Module) -> None:
    """Drop values that interventions cache between calls (e.g. LoReFT's orthonormalized rotation).

    Optimizer steps do this by themselves (``after_optimizer_step``); call it after changing
    intervention parameters in place by other means that bypass their version counters.
    """
    for module in model.modules():
        if isinstance(module, OrthonormalRows):
            module.clear_cache()


class _AfterDeepSpeedStep(TrainerCallback):
    """After each optimizer step under DeepSpeed ZeRO: the interventions' post-step updates."""

    def __init__(self, trainer: ReftTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        after_deepspeed_step(self.trainer.reft_model)


class _ResetPrefixCache(TrainerCallback):
    """Every ``train()`` starts with an empty prefix cache (the base model may have changed in between)."""

    def __init__(self, cache: PrefixCache) -> None:
        self.cache = cache

    def on_train_begin(self, args, state, control, **kwargs):
        self.cache.reset()


class ReftTrainer(Trainer):
    """A ``Trainer`` for :class:`~reftlib.ReftModel` (see the module documentation).

    Same arguments as ``transformers.Trainer``; ``tokenizer=`` is accepted as an alias of
    ``processing_class=``. Without ``data_collator`` a :class:`ReftDataCollator` is used.

    ``prefix_cache``: ``"auto"`` (default) skips the frozen layers below the lowest intervention
    on examples already trained on, when the model allows it (checked; otherwise it logs why and
    trains normally); ``True`` raises a :class:`~reftlib.errors.ReftConfigError` when it does not;
    ``False`` never skips. ``prefix_cache_max_bytes`` caps the recorded hidden states (kept on the
    CPU; default 1 GiB).
    """

    def __init__(
        self,
        model: ReftModel | None = None,
        args: TrainingArguments | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        *,
        tokenizer: Any = None,
        prefix_cache: bool | str = "auto",
        prefix_cache_max_bytes: int = 2**30,
        **kwargs: Any,
    ) -> None:
        if prefix_cache not in (True, False, "auto"):
            raise ReftConfigError(f"prefix_cache must be 'auto', True or False, got {prefix_cache!r}")
        if tokenizer is not None:
            if processing_class is not None and processing_class is not tokenizer:
                raise ReftConfigError("pass the tokenizer once, as processing_class= (tokenizer= is its old name)")
            processing_class = tokenizer
        where = type(self).__name__  # arguments of the wrong kind fail here, not deep inside transformers
        require_reft_model(model, "model", where, optional=kwargs.get("model_init") is not None)
        require_processing_class(processing_class, "processing_class", where)
        require_instance(args, TrainingArguments, "args", where, "a transformers.TrainingArguments", optional=True)
        if data_collator is None:
            data_collator = self._default_collator(model, processing_class)
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, **kwargs,
        )
        if self.is_fsdp_enabled:  # FSDP2 only; see reftlib.distributed and docs/distributed.md
            check_trainer_fsdp(self.accelerator.state.fsdp_plugin)
        elif model is not None and is_sharded(model):
            raise ReftConfigError(
                f"{where}: this ReftModel is already sharded with fully_shard, but the Trainer's FSDP is off, so it "
                "would wrap the model in DDP; pass the unsharded model with TrainingArguments(fsdp='full_shard', "
                "fsdp_config={'version': 2}), or train the sharded model in your own loop"
            )
        self._flops_per_token: int | None = None
        #: Recorded hidden states below the interventions (``None`` with ``prefix_cache=False``).
        self.prefix_cache: PrefixCache | None = None
        zero_stage = self._deepspeed_zero_stage()
        if zero_stage:  # DeepSpeed's optimizer steps its own fp32 copies: run the post-step updates after it
            self.add_callback(_AfterDeepSpeedStep(self))
        if prefix_cache is not False and (self.is_fsdp_enabled or zero_stage == 3):
            # Skipping the lower layers skips their all-gathers (FSDP, ZeRO-3) on the processes that hit
            # the cache only: the processes' collectives would no longer match.
            reason = ("FSDP is on" if self.is_fsdp_enabled else "DeepSpeed ZeRO-3 is on") + \
                " (skipping sharded layers on some processes only would desynchronize them)"
            if prefix_cache is True:
                raise ReftConfigError(f"prefix_cache=True cannot be honoured: {reason}; use prefix_cache='auto' or False")
            logger.info("reftlib: prefix cache off: %s", reason)
            prefix_cache = False
        if prefix_cache is not False:
            self.prefix_cache = PrefixCache(max_bytes=prefix_cache_max_bytes, required=prefix_cache is True)
            self.add_callback(_ResetPrefixCache(self.prefix_cache))

    def _deepspeed_zero_stage(self) -> int:
        """The DeepSpeed ZeRO stage this Trainer runs (0 without DeepSpeed)."""
        if not getattr(self, "is_deepspeed_enabled", False):
            return 0
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return int(getattr(plugin, "zero_stage", 0) or 0)

    #: ``token_level_labels`` of the default collator (``None``: decided from the data).
    _token_level_labels: bool | None = None

    @classmethod
    def _default_collator(cls, model: Any, processing_class: Any) -> ReftDataCollator:
        tokenizer = getattr(processing_class, "tokenizer", processing_class)  # processors wrap a tokenizer
        if tokenizer is not None:  # raises, saying how, when the tokenizer has no pad token
            return ReftDataCollator(tokenizer=tokenizer, token_level_labels=cls._token_level_labels)
        # Any valid id pads: the attention mask comes from lengths and labels are -100 there.
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        return ReftDataCollator(pad_token_id=int(pad) if isinstance(pad, int) else 0,
                                token_level_labels=cls._token_level_labels)

    # ------------------------------------------------------------------ model access
    @property
    def reft_model(self) -> ReftModel:
        """The (unwrapped) :class:`~reftlib.ReftModel` being trained."""
        return unwrap_model(self.accelerator.unwrap_model(self.model, keep_torch_compile=False))

    # ------------------------------------------------------------------ training step
    def training_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The Trainer's step, skipping the frozen prefix where :attr:`prefix_cache` has the batch's rows."""
        if self.prefix_cache is None or self.args.torch_compile:
            return super().training_step(model, inputs, *args, **kwargs)
        with self.prefix_cache.step(self.reft_model, inputs):
            return super().training_step(model, inputs, *args, **kwargs)

    # ------------------------------------------------------------------ inputs
    def _set_signature_columns_if_needed(self) -> None:
        """Keep the ReftModel's and the base model's forward arguments (``input_ids`` lives on the latter)."""
        if self._signature_columns is None:
            reft_model = unwrap_model(self.model)
            names: list[str] = []
            for fn in (reft_model.forward, reft_model.model.forward):
                for name, param in inspect.signature(fn).parameters.items():
                    if param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL) and name not in names:
                        names.append(name)
            for name in ("input_ids", "attention_mask", "labels", "intervention_locations", "label", "label_ids",
                         *self.label_names):
                if name not in names:
                    names.append(name)
            self._signature_columns = names

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Move tensors to the device, except the positions: reftlib reads them on the CPU (no host sync)."""
        kept = {k: inputs[k] for k in _KEEP_ON_CPU if k in inputs}
        prepared = super()._prepare_inputs({k: v for k, v in inputs.items() if k not in kept})
        prepared.update(kept)
        return prepared

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """HF's estimate (6 * tokens * non-embedding parameters), with the parameter count computed once."""
        ids = inputs.get("input_ids")
        if ids is None:
            return 0
        if self._flops_per_token is None:
            base = self.reft_model.model
            count = getattr(base, "num_parameters", None)
            self._flops_per_token = 6 * count(exclude_embeddings=True) if callable(count) else 0
        return self._flops_per_token * ids.numel()

    # ------------------------------------------------------------------ optimizer
    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Interventions decay every parameter except those named ``bias``; other modules follow HF's rule."""
        base = set(super().get_decay_parameter_names(model))
        names = []
        for name, _param in model.named_parameters():
            if _is_intervention_param(name):
                if name.rsplit(".", 1)[-1] != "bias":
                    names.append(name)
            elif name in base:
                names.append(name)
        return names

    # ------------------------------------------------------------------ saving / loading
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the reftlib files (not the base model), the tokenizer and the training arguments."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        # A gathered full state dict (FSDP, DeepSpeed) holds the weights; DeepSpeed's empty placeholder does not.
        self.reft_model.save_pretrained(output_dir, state_dict=state_dict or None)
        peft_model = _trained_peft_model(self.reft_model)
        if peft_model is not None:  # LoRA trained together with the interventions
            peft_model.save_pretrained(os.path.join(output_dir, LORA_SUBFOLDER))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Put the reftlib files in ``output_dir`` too: HF only copies its own weight file names there."""
        if self.is_world_process_zero() and self.args.hub_strategy != "end":
            self.reft_model.save_pretrained(self.args.output_dir)
        super()._push_from_checkpoint(checkpoint_folder)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Load the interventions saved in ``resume_from_checkpoint`` into the model being trained."""
        target = unwrap_model(self.accelerator.unwrap_model(model if model is not None else self.model))
        if is_sharded(target):  # FSDP2: each process keeps its shard of the saved tensors
            load_sharded_intervention_weights(target, resume_from_checkpoint)
        else:
            load_intervention_weights(target, resume_from_checkpoint)
        _load_lora_weights(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """Load the interventions of ``state.best_model_checkpoint`` (``load_best_model_at_end``)."""
        load_intervention_weights(self.reft_model, self.state.best_model_checkpoint)
        _load_lora_weights(self.reft_model, self.state.best_model_checkpoint)

    # ------------------------------------------------------------------ loss normalization
    def _normalize(self, loss: torch.Tensor, count: torch.Tensor | None, num_items_in_batch) -> torch.Tensor:
        """Divide a summed loss by the items of the accumulated batch, or by ``count`` (this batch) without it."""
        if num_items_in_batch is None:
            return loss / count.clamp(min=1)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
        if self.args.average_tokens_across_devices:
            # num_items_in_batch counts every process's tokens and DDP averages gradients: undo the average.
            tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1  # older transformers: no TP
            scale = self.accelerator.num_processes // tp_size
            loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return loss


class ReftTrainerForCausalLM(ReftTrainer):
    """Next-token training of the interventions: cross-entropy on tokens whose label is not ``-100``.

    The summed token loss is divided by ``num_items_in_batch`` (supervised tokens in the whole
    accumulated, cross-process batch), so gradient accumulation and DDP reproduce the gradient
    of one large batch; without it (evaluation) the loss is the mean over supervised tokens.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True  # ask the Trainer to count num_items_in_batch
        self._loss_shifts_labels = True  # ... over labels[:, 1:], like HF's causal-LM loss
        self._logits_to_keep_supported: bool | None = None
        self._head_on_supervised: bool | None = None  # LM head on supervised positions only (None: untried)
        self._output_head: nn.Module | None = None

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """As :meth:`ReftTrainer._prepare_inputs`, and the labels stay on the CPU too.

        The loss reads them there to decide how many trailing positions need logits (no device
        sync), then moves them to the device itself.
        """
        labels = inputs.get("labels")
        prepared = super()._prepare_inputs(inputs)
        if labels is not None:
            prepared["labels"] = labels
        return prepared

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ReftConfigError("ReftTrainerForCausalLM needs 'labels' in every batch (-100 on prompt tokens)")
        # Shift by padding the labels (as HF does) instead of slicing the logits: no copy of [B, T, V].
        targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
        keep = None if return_outputs else self._logits_to_keep(targets)
        if keep is not None:
            inputs["logits_to_keep"] = keep
            targets = targets[:, -keep:]
        outputs = None
        supervised = None if return_outputs else self._supervised_entries(targets)
        if supervised is not None:
            outputs = self._forward_with_supervised_logits(model, inputs, supervised)
            if outputs is not None:
                targets = targets[supervised]
        if outputs is None:
            outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        targets = targets.to(logits.device, non_blocking=True)
        loss = F.cross_entropy(logits.float().flatten(0, -2), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction="sum")
        count = (targets != IGNORE_INDEX).sum() if num_items_in_batch is None else None
        loss = self._normalize(loss, count, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _logits_to_keep(self, targets: torch.Tensor) -> int | None:
        """How many trailing positions hold a supervised target, when the LM head can skip the others.

        Supervised answers follow their prompts, so on typical instruction data only the last
        third or so of the padded positions need logits; the LM head (hidden × vocabulary) is a
        large share of a small model's forward, and its logits the largest activation kept for
        backward. Hugging Face causal LMs take ``logits_to_keep=k`` to compute the last ``k``
        only; the loss is unchanged because every earlier target is ``-100``. ``None`` when the
        labels are on an accelerator (reading them would sync), when nothing would be saved, or
        when the model's forward has no ``logits_to_keep`` argument.
        """
        if targets.device.type != "cpu" or targets.dim() != 2 or not self._accepts_logits_to_keep():
            return None
        supervised = (targets != IGNORE_INDEX).any(dim=0).nonzero()
        first = int(supervised[0]) if len(supervised) else targets.shape[1] - 1
        keep = targets.shape[1] - first
        return keep if keep < targets.shape[1] else None

    def _supervised_entries(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(rows, columns)`` of the supervised targets, when computing logits only there saves work."""
        if self._head_on_supervised is False or targets.device.type != "cpu" or targets.dim() != 2:
            return None
        mask = targets != IGNORE_INDEX
        if bool(mask.all()) or not bool(mask.any()):
            return None
        return mask.nonzero(as_tuple=True)

    def _forward_with_supervised_logits(self, model: nn.Module, inputs: dict[str, Any],
                                        supervised: tuple[torch.Tensor, torch.Tensor]) -> Any:
        """Run ``model`` with its LM head applied to the supervised positions only (logits ``[1, n, vocab]``).

        ``logits_to_keep`` trims the positions every row shares; rows still differ in where their
        answer starts and ends (padding, prompt lengths), and on short answers half of the kept
        positions can be padding or prompt. A pre-hook on the output embeddings picks the ``n``
        supervised hidden states before the vocabulary projection, which is the largest matrix
        product of a small model. The first call checks that the model hands the head's output
        back unchanged in shape (``None`` is returned and plain logits are used from then on if it
        does not, e.g. a model that reshapes its logits per row).
        """
        head = innermost_model(self.reft_model.model).get_output_embeddings() if self._head_on_supervised is None \
            else self._output_head
        if not isinstance(head, nn.Module):
            self._head_on_supervised = False
            return None
        self._output_head = head
        device = next(head.parameters()).device
        rows, columns = (to_device(index, device) for index in supervised)

        def pick(module: nn.Module, args: tuple) -> tuple | None:
            if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 3:
                return None
            return (args[0][rows, columns].unsqueeze(0), *args[1:])

        handle = head.register_forward_pre_hook(pick)
        probing = self._head_on_supervised is None
        try:
            outputs = model(**inputs)
        except RuntimeError:
            if not probing:
                raise
            outputs = None
        finally:
            handle.remove()
        logits = None if outputs is None else (outputs["logits"] if isinstance(outputs, dict) else outputs.logits)
        if logits is None or logits.dim() != 3 or tuple(logits.shape[:2]) != (1, len(supervised[0])):
            if not probing:
                raise ReftConfigError(f"the model's logits changed shape between steps ({tuple(logits.shape)})")
            self._head_on_supervised = False
            return None
        self._head_on_supervised = True
        return outputs

    def _accepts_logits_to_keep(self) -> bool:
        if self._logits_to_keep_supported is None:
            base = innermost_model(self.reft_model.model)
            self._logits_to_keep_supported = "logits_to_keep" in inspect.signature(base.forward).parameters
        return self._logits_to_keep_supported


class ReftTrainerForSequenceClassification(ReftTrainer):
    """Train interventions and the head of a :class:`~reftlib.training.ReftModelForSequenceClassification`.

    Loss per :func:`~reftlib.training.classification.classification_loss` (cross-entropy, MSE for
    ``num_labels=1``, BCE for multi-label), summed and divided by ``num_items_in_batch`` (labels
    in the accumulated batch) like the causal-LM trainer.
    """

    _token_level_labels = False  # one label (or one label vector) per example

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        model = kwargs.get("model", args[0] if args else None)
        if model is not None and not isinstance(unwrap_model(model), ReftModelForSequenceClassification):
            raise ReftConfigError(
                "ReftTrainerForSequenceClassification trains a ReftModelForSequenceClassification; build one with "
                "reftlib.training.get_reft_model_for_sequence_classification(model, config, num_labels=...)"
            )
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True  # ask the Trainer to count num_items_in_batch
        self._loss_shifts_labels = False  # ... one label (vector) per example, no shift

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ReftConfigError("ReftTrainerForSequenceClassification needs 'labels' in every batch")
        outputs = model(**inputs)
        labels = labels.to(outputs.logits.device)
        problem_type = self.reft_model.problem_type
        loss = classification_loss(outputs.logits, labels, problem_type, reduction="sum")
        count = None
        if num_items_in_batch is None:  # the Trainer counts labels that are not -100: count the same way
            count = labels.numel() if problem_type == "regression" else (labels != IGNORE_INDEX).sum()
            count = torch.as_tensor(count, device=loss.device)
        loss = self._normalize(loss, count, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


def _trained_peft_model(reft_model: ReftModel) -> nn.Module | None:
    """The ``PeftModel`` under ``reft_model`` when some of its (LoRA) weights are being trained."""
    if importlib.util.find_spec("peft") is None:
        return None
    model = find_peft_model(reft_model)
    return model if model is not None and any(p.requires_grad for p in model.parameters()) else None


def _load_lora_weights(reft_model: ReftModel, folder: str | os.PathLike) -> None:
    """Load ``folder/lora`` (written by :meth:`ReftTrainer._save`) into the trained ``PeftModel``, in place."""
    peft_model = _trained_peft_model(reft_model)
    lora = os.path.join(folder, LORA_SUBFOLDER)
    if peft_model is None:
        return
    if not os.path.isdir(lora):
        raise CheckpointError(
            f"{folder} has no {LORA_SUBFOLDER}/ folder but the model trains LoRA weights: the checkpoint was written "
            "without them (resume from a checkpoint saved while training the same PeftModel)"
        )
    from peft import load_peft_weights, set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, load_peft_weights(lora, device="cpu"),
                                       adapter_name=peft_model.active_adapter)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise CheckpointError(f"{lora} lacks LoRA weights of the model ({missing[:3]}...): another LoRA config?")


def _is_intervention_param(name: str) -> bool:
    return name.startswith("adapters.") or ".adapters." in name

