"""Direct preference optimization (DPO) of interventions, with the model itself as the reference.

DPO (Rafailov et al., 2023) trains a policy on ``(prompt, chosen, rejected)`` triples with

    loss = -log sigmoid(β · [(log π(y_c|x) - log π_ref(y_c|x)) - (log π(y_r|x) - log π_ref(y_r|x))])

where ``log π(y|x)`` is the summed log-probability of the answer tokens. With interventions the
reference policy is simply the same model with its interventions switched off, so no second copy
of the model is needed: :class:`ReftDPOTrainer` computes the reference log-probabilities with
``reft_model.disable_interventions()`` under ``torch.no_grad()`` (or once before training with
``precompute_reference=True``). It works for any reftlib intervention (LoFiT offsets at every
position, LoReFT at the last prompt token, ...). :class:`AdapterDPOTrainer` applies the same loss,
collator and logging to any model whose adapter can be switched off with ``disable_adapter()``
(a ``peft.PeftModel``), so LoRA baselines are trained with the identical objective.

Data: :func:`make_preference_data_module` tokenizes the triples (labels ``-100`` on the prompt,
intervention positions on the prompt, or none for interventions that act on every position) and
:class:`ReftDPODataCollator` pads a batch of ``B`` pairs into one ``[2B, T]`` batch, chosen rows
first, so the policy (and the reference) need one forward pass per batch.

Logged metrics (as in TRL): ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``, averaged over the logging interval.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer

from ..checks import describe, require_model, require_processing_class, require_tokenizer, unwrap_model
from ..errors import ArgumentTypeError, InputError, ReftConfigError
from ..model import ReftModel
from .data import IGNORE_INDEX, ReftDataCollator, make_supervised_examples
from .trainer import ReftTrainer

__all__ = [
    "AdapterDPOTrainer",
    "ReftDPODataCollator",
    "ReftDPOTrainer",
    "dpo_loss",
    "make_preference_data_module",
    "make_preference_dataset",
    "sequence_logps",
]

_PAIR_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
_REFERENCE_COLUMNS = ("reference_chosen_logps", "reference_rejected_logps")


# --------------------------------------------------------------------------- data
def _base_model(model: Any) -> Any:
    """The Hugging Face model inside a :class:`~reftlib.ReftModel` (its interventions do not count here)."""
    return model.model if isinstance(model, ReftModel) else model


def make_preference_dataset(
    tokenizer: Any,
    triples: Sequence[Sequence[str]],
    *,
    positions: str | None = None,
    num_interventions: int = 1,
    nonstop: bool = True,
    max_length: int | None = None,
    model: Any = None,
):
    """A ``datasets.Dataset`` of tokenized preference pairs.

    Columns ``chosen_input_ids``/``chosen_labels`` and ``rejected_input_ids``/``rejected_labels``
    (labels ``-100`` on the prompt tokens) and, when ``positions`` is a spec such as ``"l1"``,
    ``intervention_locations`` (``[num_interventions, n]`` prompt positions, shared by both answers:
    the prompt is tokenized once the same way). ``positions=None`` stores no positions, so
    interventions configured with ``positions=None`` act on every token (LoFiT).

    ``nonstop=True`` (default) scores the answers without an appended EOS, like the multiple-choice
    scoring of TruthfulQA; ``model`` (or a ReftModel on it) only sets the default ``max_length``.
    """
    import datasets

    where = "make_preference_dataset"
    require_tokenizer(tokenizer, "tokenizer", where)
    require_model(model, "model", where, optional=True, allow_reft_model=True)
    if isinstance(triples, (str, bytes)) or not isinstance(triples, Iterable):
        raise ArgumentTypeError(
            f"{where}(triples=...) expects a list of (prompt, chosen, rejected) triples of strings, "
            f"got {type(triples).__name__}"
        )
    triples = list(triples)
    if not triples:
        raise InputError("no preference triples given; pass a list of (prompt, chosen, rejected)")
    for i, row in enumerate(triples):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or len(row) != 3 \
                or not all(isinstance(x, str) for x in row):
            raise InputError(f"preference example {i} is {row!r}; expected a (prompt, chosen, rejected) triple of strings")
    prompts = [r[0] for r in triples]
    common = dict(num_interventions=num_interventions, nonstop=nonstop, max_length=max_length,
                  model=_base_model(model), share_weights=True)
    spec = positions or "l1"
    chosen = make_supervised_examples(tokenizer, prompts, [r[1] for r in triples], spec, **common)
    rejected = make_supervised_examples(tokenizer, prompts, [r[2] for r in triples], spec, **common)
    columns = {
        "chosen_input_ids": chosen["input_ids"], "chosen_labels": chosen["labels"],
        "rejected_input_ids": rejected["input_ids"], "rejected_labels": rejected["labels"],
    }
    if positions is not None:
        columns["intervention_locations"] = chosen["intervention_locations"]
    return datasets.Dataset.from_dict(columns)


def make_preference_data_module(
    tokenizer: Any,
    model: Any,
    triples: Sequence[Sequence[str]],
    *,
    positions: str | None = None,
    num_interventions: int = 1,
    nonstop: bool = True,
    max_length: int | None = None,
    padding_side: Literal["right", "left"] = "right",
) -> dict[str, Any]:
    """``dict(train_dataset=..., eval_dataset=None, data_collator=ReftDPODataCollator)`` for :class:`ReftDPOTrainer`.

    See :func:`make_preference_dataset` for the columns and ``positions``. ``model`` is the
    :class:`~reftlib.ReftModel` to train (or its base model): it sets the default ``max_length``.
    """
    require_tokenizer(tokenizer, "tokenizer", "make_preference_data_module")
    require_model(model, "model", "make_preference_data_module", allow_reft_model=True)
    collator = ReftDPODataCollator(tokenizer=tokenizer, padding_side=padding_side)
    dataset = make_preference_dataset(tokenizer, triples, positions=positions, num_interventions=num_interventions,
                                      nonstop=nonstop, max_length=max_length, model=model)
    return {"train_dataset": dataset, "eval_dataset": None, "data_collator": collator}


@dataclass
class ReftDPODataCollator:
    """Pad ``B`` preference pairs into one batch of ``2B`` rows: the chosen answers, then the rejected ones.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (``-100`` on prompts and padding) and,
    when the examples have them, ``intervention_locations`` (the prompt positions, repeated for
    both halves) and ``reference_logps`` (``[2B]``, precomputed reference log-probabilities).
    Padding follows :class:`~reftlib.training.ReftDataCollator` (right by default; the attention
    mask comes from the lengths).
    """

    tokenizer: Any = None
    padding_side: Literal["right", "left"] = "right"
    pad_to_multiple_of: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        self._inner = ReftDataCollator(tokenizer=self.tokenizer, padding_side=self.padding_side,
                                       pad_to_multiple_of=self.pad_to_multiple_of, pad_token_id=self.pad_token_id,
                                       token_level_labels=True)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise InputError("cannot collate an empty batch")
        missing = [c for c in _PAIR_COLUMNS if c not in features[0]]
        if missing:
            raise InputError(
                f"preference examples need the columns {list(_PAIR_COLUMNS)} (missing {missing}); build them with "
                "reftlib.training.make_preference_data_module"
            )
        rows = []
        for side in ("chosen", "rejected"):
            for f in features:
                row = {"input_ids": f[f"{side}_input_ids"], "labels": f[f"{side}_labels"]}
                if "intervention_locations" in f:
                    row["intervention_locations"] = f["intervention_locations"]
                rows.append(row)
        batch = self._inner(rows)
        if all(c in features[0] for c in _REFERENCE_COLUMNS):
            batch["reference_logps"] = torch.tensor(
                [float(f[c]) for c in _REFERENCE_COLUMNS for f in features], dtype=torch.float32
            )
        return batch


# --------------------------------------------------------------------------- loss
def _logits_to_keep_supported(model: nn.Module) -> bool:
    """Whether the Hugging Face model under ``model`` accepts ``logits_to_keep`` (most causal LMs do)."""
    base = unwrap_model(model)
    for _ in range(4):  # ReftModel -> (PeftModel -> LoraModel ->) PreTrainedModel
        if isinstance(base, ReftModel):
            base = base.model
        elif hasattr(base, "get_base_model"):
            base = base.get_base_model()
        else:
            break
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def sequence_logps(model: nn.Module, inputs: Mapping[str, Any], labels: torch.Tensor,
                   logits_to_keep: bool | None = None) -> torch.Tensor:
    """Summed log-probability of the supervised tokens (``labels != -100``) of each row, in fp32.

    ``inputs`` are the model's inputs (without labels). When the model supports it, logits are
    computed only from the first supervised position on (``logits_to_keep``), which skips the
    language-model head on most prompt tokens.
    """
    length = labels.shape[1]
    supervised = labels != IGNORE_INDEX
    if not bool(supervised.any()):
        raise InputError("a preference batch has no supervised answer token (every label is -100)")
    keep = length
    if logits_to_keep is None:
        logits_to_keep = _logits_to_keep_supported(model)
    if logits_to_keep:
        first = int(supervised.float().argmax(dim=1)[supervised.any(dim=1)].min())
        keep = min(length, length - first + 1)  # a label at position 0 has no logit predicting it
        inputs = {**inputs, "logits_to_keep": keep}
    outputs = model(**inputs)
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    logits = logits[:, -keep:]
    # logits[:, j] (absolute position length - keep + j) predicts the token after it.
    targets = F.pad(labels[:, length - keep + 1:], (0, 1), value=IGNORE_INDEX).to(logits.device)
    token_logps = -F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                                   reduction="none")
    return token_logps.view(targets.shape).sum(dim=1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean DPO loss over pairs and its statistics (rewards are ``β · (log π - log π_ref)``).

    ``label_smoothing`` > 0 gives the conservative DPO variant (cDPO): the preference label is
    assumed flipped with that probability.
    """
    chosen_rewards = beta * (policy_chosen - reference_chosen)
    rejected_rewards = beta * (policy_rejected - reference_rejected)
    margin = chosen_rewards - rejected_rewards
    losses = -F.logsigmoid(margin) * (1 - label_smoothing) - F.logsigmoid(-margin) * label_smoothing
    stats = {
        "rewards/chosen": chosen_rewards.detach().mean(),
        "rewards/rejected": rejected_rewards.detach().mean(),
        "rewards/margins": margin.detach().mean(),
        "rewards/accuracies": (margin.detach() > 0).float().mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }
    return losses.mean(), stats


class _DPOMixin:
    """The DPO loss, reference pass, precomputation and metric logging shared by both trainers."""

    beta: float
    label_smoothing: float

    def _init_dpo(self, beta: float, label_smoothing: float, precompute_reference: bool) -> None:
        if not beta > 0:
            raise ReftConfigError(f"beta must be positive, got {beta}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ReftConfigError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta, self.label_smoothing = float(beta), float(label_smoothing)
        # The DPO loss is a mean over the micro-batch's pairs: let the Trainer divide by the
        # accumulation steps (no num_items_in_batch normalization).
        self.model_accepts_loss_kwargs = False
        self._dpo_stats: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}
        self._logits_to_keep = _logits_to_keep_supported(self.model)
        if precompute_reference:
            if self.train_dataset is not None:
                self.train_dataset = self.add_reference_logps(self.train_dataset)
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self.add_reference_logps(v) for k, v in self.eval_dataset.items()}
            elif self.eval_dataset is not None:
                self.eval_dataset = self.add_reference_logps(self.eval_dataset)

    # -- the reference policy -----------------------------------------------------------------
    @contextlib.contextmanager
    def reference_mode(self) -> Iterator[nn.Module]:
        """Yield the model switched to the reference policy (interventions / adapter off), without grad."""
        model = unwrap_model(self.accelerator.unwrap_model(self.model))
        if isinstance(model, ReftModel):
            switch = model.disable_interventions()
        elif hasattr(model, "disable_adapter"):
            switch = model.disable_adapter()
        else:  # pragma: no cover - rejected at construction
            raise ReftConfigError(f"{type(model).__name__} has no way to switch its adapter off")
        with torch.no_grad(), switch:
            yield model

    @torch.no_grad()
    def add_reference_logps(self, dataset):
        """Return ``dataset`` with the columns ``reference_chosen_logps``/``reference_rejected_logps``.

        Computed once with the interventions switched off, in eval mode, in batches of
        ``args.per_device_eval_batch_size`` pairs; training then skips the reference forward pass.
        """
        collator = self.data_collator
        size = max(1, int(self.args.per_device_eval_batch_size))
        chosen: list[float] = []
        rejected: list[float] = []
        model = unwrap_model(self.accelerator.unwrap_model(self.model))
        was_training = model.training
        model.eval()
        try:
            with self.reference_mode() as reference:
                device = next(reference.parameters()).device
                for start in range(0, len(dataset), size):
                    features = [dataset[i] for i in range(start, min(start + size, len(dataset)))]
                    batch = collator([{k: f[k] for k in f if k not in _REFERENCE_COLUMNS} for f in features])
                    logps = self._batch_logps(reference, batch, device).cpu()
                    n = len(features)
                    chosen.extend(logps[:n].tolist())
                    rejected.extend(logps[n:].tolist())
        finally:
            model.train(was_training)
        dataset = dataset.remove_columns([c for c in _REFERENCE_COLUMNS if c in dataset.column_names])
        return dataset.add_column(_REFERENCE_COLUMNS[0], chosen).add_column(_REFERENCE_COLUMNS[1], rejected)

    def _batch_logps(self, model: nn.Module, batch: Mapping[str, Any], device: torch.device) -> torch.Tensor:
        inputs = {k: (v.to(device) if torch.is_tensor(v) and k != "intervention_locations" else v)
                  for k, v in batch.items() if k not in ("labels", "reference_logps")}
        return sequence_logps(model, inputs, batch["labels"].to(device), self._logits_to_keep)

    # -- loss -----------------------------------------------------------------------------------
    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise InputError("a DPO batch needs 'labels'; build the data with make_preference_data_module")
        reference = inputs.pop("reference_logps", None)
        rows = labels.shape[0]
        if rows % 2:
            raise InputError(f"a DPO batch must hold chosen and rejected rows (an even count), got {rows}")
        policy = sequence_logps(model, inputs, labels, self._logits_to_keep)
        if reference is None:
            with self.reference_mode() as ref_model:
                reference = sequence_logps(ref_model, inputs, labels, self._logits_to_keep)
        reference = reference.to(policy.device, policy.dtype)
        n = rows // 2
        loss, stats = dpo_loss(policy[:n], policy[n:], reference[:n], reference[n:], self.beta, self.label_smoothing)
        store = self._dpo_stats["train" if model.training else "eval"]
        for key, value in stats.items():
            store.setdefault(key, []).append(float(value))
        if return_outputs:
            return loss, {"chosen_logps": policy[:n].detach(), "rejected_logps": policy[n:].detach()}
        return loss

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        """Evaluation: the DPO loss only (there are no logits to gather for preference pairs)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averaged DPO statistics of the interval to the Trainer's log."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for key, values in self._dpo_stats[mode].items():
            if values:
                logs[f"{prefix}{key}"] = sum(values) / len(values)
        self._dpo_stats[mode] = {}
        super().log(logs, start_time)

    # -- columns / collator ------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for name in (*_PAIR_COLUMNS, *_REFERENCE_COLUMNS, "intervention_locations"):
            if name not in self._signature_columns:
                self._signature_columns.append(name)


class ReftDPOTrainer(_DPOMixin, ReftTrainer):
    """DPO for the interventions of a :class:`~reftlib.ReftModel`; the reference is the model with interventions off.

    Args (besides those of :class:`~reftlib.training.ReftTrainer`):
        beta: the DPO temperature β (default 0.1).
        label_smoothing: conservative-DPO label noise (default 0: standard DPO).
        precompute_reference: compute the reference log-probabilities once before training (and for
            the eval set) instead of one extra no-grad forward per step. Exact as long as the base
            model is frozen, which it is for interventions.

    Batches come from :func:`make_preference_data_module` (default collator: :class:`ReftDPODataCollator`).
    """

    def __init__(self, *args: Any, beta: float = 0.1, label_smoothing: float = 0.0,
                 precompute_reference: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_dpo(beta, label_smoothing, precompute_reference)

    @staticmethod
    def _default_collator(model: Any, processing_class: Any) -> ReftDPODataCollator:
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if tokenizer is not None:
            return ReftDPODataCollator(tokenizer=tokenizer)
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        return ReftDPODataCollator(pad_token_id=int(pad) if isinstance(pad, int) else 0)


class AdapterDPOTrainer(_DPOMixin, Trainer):
    """The same DPO loss for a model whose adapter has a ``disable_adapter()`` switch (a ``peft.PeftModel``).

    Used for LoRA baselines trained with exactly the objective, collator and logging of
    :class:`ReftDPOTrainer`; the reference is the model with the adapter disabled. Saving and
    checkpoints are the plain ``Trainer``'s (for a ``PeftModel``: the adapter files).
    """

    def __init__(self, model: nn.Module | None = None, args: Any = None, data_collator: Any = None,
                 train_dataset: Any = None, eval_dataset: Any = None, processing_class: Any = None, *,
                 tokenizer: Any = None, beta: float = 0.1, label_smoothing: float = 0.0,
                 precompute_reference: bool = False, **kwargs: Any) -> None:
        if tokenizer is not None:
            processing_class = processing_class or tokenizer
        require_processing_class(processing_class, "processing_class", "AdapterDPOTrainer")
        if not isinstance(model, nn.Module) or not hasattr(unwrap_model(model), "disable_adapter"):
            raise ArgumentTypeError(
                "AdapterDPOTrainer(model=...) expects a model with a disable_adapter() context manager "
                f"(a peft.PeftModel), got {describe(model)}; for reftlib interventions use ReftDPOTrainer"
            )
        if data_collator is None:
            data_collator = ReftDPOTrainer._default_collator(model, processing_class)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self._init_dpo(beta, label_smoothing, precompute_reference)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["input_ids", "attention_mask", "labels"]
        super()._set_signature_columns_if_needed()
