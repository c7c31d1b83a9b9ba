"""Sequence classification with ReFT: interventions plus a small trainable head.

:class:`ReftModelForSequenceClassification` is a :class:`~reftlib.ReftModel` that runs the base
model's *backbone* (``model.base_model``: e.g. ``LlamaModel`` inside ``LlamaForCausalLM``, so
the language-model head is never computed) with the interventions active, pools its final
hidden states (``last_hidden_state``: after the final norm on decoders) and applies
:class:`ReftClassificationHead` (dropout + ``Linear(hidden, num_labels)``).

Pooling (``pooling="auto"``): encoders, i.e. model types that have a masked-LM head in
transformers (BERT, RoBERTa, ...), read the **first** real token (``[CLS]``); every other model
(and any config with ``is_decoder=True``) reads the **last** real token, which under causal
attention is the only one that has seen the whole text. ``"mean"`` averages the real tokens.
Both work with left or right padding (computed from the attention mask, on device).

Losses follow Hugging Face's ``problem_type``: ``num_labels == 1`` is regression (MSE),
integer labels single-label classification (cross-entropy, ``-100`` ignored), and
``problem_type="multi_label_classification"`` binary cross-entropy on 0/1 label vectors.

The head is saved and loaded with the interventions: its tensors in ``reft_model.safetensors``
under the ``__extra__.`` prefix, its options (``num_labels``, ``pooling``, ``problem_type``,
``dropout``) by name in the config's ``"extra"`` entry (through :meth:`extra_state_dict`,
:meth:`extra_config` and :meth:`load_extra_state_dict`)::

    reft_model = get_reft_model_for_sequence_classification(model, config, num_labels=3)
    ...  # train with ReftTrainerForSequenceClassification
    reft_model.save_pretrained("out")
    loaded = ReftModelForSequenceClassification.from_pretrained("out", base_model)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from ..checks import require_model
from ..components import text_config
from ..config import ReftConfig
from ..errors import CheckpointError, ReftConfigError
from ..inputs import attention_mask_of, input_length
from ..io import load_reft_model
from ..model import DEFAULT_ADAPTER, ReftModel

POOLING_MODES = ("first", "last", "mean")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
_HEAD_CONFIG_KEY = "classifier.config"  # the head options as indices, in files saved before they were stored by name

__all__ = [
    "POOLING_MODES",
    "PROBLEM_TYPES",
    "ReftClassificationHead",
    "ReftModelForSequenceClassification",
    "classification_loss",
    "default_pooling",
    "get_reft_model_for_sequence_classification",
]


def default_pooling(model: nn.Module) -> str:
    """``"first"`` for encoders (model types with a masked-LM head), ``"last"`` otherwise."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    config = text_config(model)
    if getattr(config, "is_decoder", False):
        return "last"
    return "first" if getattr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "last"


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, problem_type: str,
                        reduction: str = "mean") -> torch.Tensor:
    """The loss of ``problem_type`` (see :data:`PROBLEM_TYPES`), computed in fp32.

    With ``reduction="sum"`` the result divided by the number of label entries that are not
    ``-100`` equals the mean, which is how the trainer normalizes across gradient accumulation.
    """
    logits = logits.float()
    if problem_type == "regression":
        if logits.shape[-1] == 1:
            return F.mse_loss(logits.squeeze(-1), labels.float().reshape(logits.shape[:-1]), reduction=reduction)
        return F.mse_loss(logits, labels.float(), reduction=reduction)
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits, labels.long().reshape(-1), ignore_index=-100, reduction=reduction)
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction=reduction)
    raise ReftConfigError(f"unknown problem_type {problem_type!r}; use one of {list(PROBLEM_TYPES)}")


class ReftClassificationHead(nn.Module):
    """``Linear(hidden, num_labels)`` after dropout, on one pooled vector per example (fp32)."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.0) -> None:
        super().__init__()
        if num_labels < 1:
            raise ReftConfigError(f"num_labels must be at least 1, got {num_labels}")
        self.dropout = nn.Dropout(float(dropout))
        self.out_proj = nn.Linear(hidden_size, num_labels)

    @property
    def num_labels(self) -> int:
        return self.out_proj.out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.dropout(features.to(self.out_proj.weight.dtype)))


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, mode: str) -> torch.Tensor:
    """One vector per row of ``hidden`` ``[batch, seq, dim]``: its first / last real token or their mean."""
    batch, length = hidden.shape[:2]
    if attention_mask is None:
        if mode == "mean":
            return hidden.mean(dim=1)
        return hidden[:, 0 if mode == "first" else -1]
    mask = attention_mask.to(hidden.device)
    if mode == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    if mode == "first":
        index = mask.long().argmax(dim=-1)  # first real token (left or right padding)
    else:
        index = (torch.arange(length, device=hidden.device) * mask.long()).argmax(dim=-1)  # last real token
    return hidden[torch.arange(batch, device=hidden.device), index]


class ReftModelForSequenceClassification(ReftModel):
    """A :class:`~reftlib.ReftModel` with a classification head; ``forward`` returns
    :class:`~transformers.modeling_outputs.SequenceClassifierOutput` (``loss`` when ``labels`` are given).

    Build it with :func:`get_reft_model_for_sequence_classification`; load a saved one with
    :meth:`from_pretrained`.
    """

    def __init__(
        self,
        model: nn.Module,
        config: ReftConfig | None = None,
        adapter_name: str = DEFAULT_ADAPTER,
        *,
        num_labels: int | None = None,
        pooling: str = "auto",
        classifier_dropout: float = 0.0,
        problem_type: str | None = None,
    ) -> None:
        super().__init__(model, config, adapter_name=adapter_name)
        if num_labels is None:
            num_labels = int(getattr(model.config, "num_labels", 2) or 2)
        pooling = default_pooling(model) if pooling == "auto" else pooling
        if pooling not in POOLING_MODES:
            raise ReftConfigError(f"pooling must be 'auto' or one of {list(POOLING_MODES)}, got {pooling!r}")
        if problem_type is None:
            problem_type = "regression" if num_labels == 1 else "single_label_classification"
        if problem_type not in PROBLEM_TYPES:
            raise ReftConfigError(f"unknown problem_type {problem_type!r}; use one of {list(PROBLEM_TYPES)}")
        self.pooling = pooling
        self.problem_type = problem_type
        width, device = self._backbone_width()
        self.classifier = ReftClassificationHead(width, num_labels, classifier_dropout).to(device)

    # ------------------------------------------------------------------ structure
    @property
    def backbone(self) -> nn.Module:
        """The base model without its task head (``model.base_model``), whose output the head reads."""
        base = getattr(self.model, "base_model", None)
        return base if isinstance(base, nn.Module) else self.model

    @property
    def num_labels(self) -> int:
        return self._modules["classifier"].num_labels

    def _backbone_width(self) -> tuple[int, torch.device]:
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        device = embeddings.weight.device if embeddings is not None else self.device
        with torch.no_grad(), self.runtime.base_only():
            ids = torch.tensor([[1, 2]], device=device)
            hidden = _last_hidden_state(self.backbone(input_ids=ids, attention_mask=torch.ones_like(ids)))
        return int(hidden.shape[-1]), hidden.device

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        intervention_locations: torch.Tensor | None = None,
        unit_locations: Any = None,
        adapter_names: Sequence[str | None] | None = None,
        check_finite: bool = False,
        **model_kwargs: Any,
    ) -> SequenceClassifierOutput:
        """Classify ``input_ids`` with interventions at ``unit_locations`` / ``intervention_locations``."""
        inputs = {k: v for k, v in (("input_ids", input_ids), ("attention_mask", attention_mask)) if v is not None}
        inputs.update(model_kwargs)
        inputs.pop("num_items_in_batch", None)
        mask = attention_mask_of(inputs)
        plan = self.plan_call(mask[:, -input_length(inputs):], unit_locations=unit_locations,
                              intervention_locations=intervention_locations, adapter_names=adapter_names,
                              check_finite=check_finite)
        backbone = self.backbone
        with self.runtime.run(plan):
            if backbone is not self.model:
                self.runtime.begin_forward(inputs)  # the bookkeeping the base model's pre-hook would do
            hidden = _last_hidden_state(backbone(**inputs))
        logits = self.classifier(pool(hidden, attention_mask, self.pooling))
        loss = classification_loss(logits, labels, self.problem_type) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    # ------------------------------------------------------------------ persistence
    def extra_state_dict(self) -> dict[str, torch.Tensor]:
        """The head's tensors, saved with the interventions (under ``__extra__.``).

        They are named as in ``reft_model.state_dict()`` (``classifier.out_proj.weight``, ...), so
        ``save_pretrained(state_dict=...)`` takes them from a gathered full state dict too.
        """
        head = self._modules["classifier"]
        return {f"classifier.{k}": v.detach().contiguous().cpu() for k, v in head.state_dict().items()}

    def extra_config(self) -> dict[str, Any]:
        """The head's options by name (saved in the config's ``"extra"`` entry, as JSON)."""
        head = self._modules["classifier"]
        return {"classifier": {"num_labels": head.num_labels, "pooling": self.pooling,
                               "problem_type": self.problem_type, "dropout": head.dropout.p}}

    def load_extra_state_dict(self, tensors: Mapping[str, torch.Tensor],
                              config: Mapping[str, Any] | None = None) -> None:
        """Restore the head saved by :meth:`extra_state_dict` / :meth:`extra_config` (rebuilt if its size differs).

        Files written before the options were saved by name hold them as a tensor of indices
        (``classifier.config`` = ``[num_labels, pooling index, problem_type index]``); those still load.
        """
        options = _head_options(tensors, config)
        if options is None:
            return
        weights = {k.removeprefix("classifier."): v for k, v in tensors.items()
                   if k.startswith("classifier.") and k != _HEAD_CONFIG_KEY}
        if "out_proj.weight" not in weights:
            raise CheckpointError(f"the saved classification head has no weights (tensors: {sorted(tensors)})")
        self.pooling, self.problem_type = options["pooling"], options["problem_type"]
        num_labels = options["num_labels"]
        head = self._modules["classifier"]
        dropout = options.get("dropout", head.dropout.p)
        width = weights["out_proj.weight"].shape[1]
        if head.num_labels != num_labels or head.out_proj.in_features != width or head.dropout.p != dropout:
            device = head.out_proj.weight.device
            head = ReftClassificationHead(width, num_labels, dropout).to(device)
            self.classifier = head
        head.load_state_dict(weights, strict=True)
        self._head_loaded = True

    @classmethod
    def from_pretrained(cls, path_or_repo_id, model: nn.Module, *, adapter_name: str = DEFAULT_ADAPTER,
                        is_trainable: bool = False, **hub_kwargs: Any) -> ReftModelForSequenceClassification:
        """Load interventions *and* the classification head saved by :meth:`save_pretrained`."""
        loaded = load_reft_model(path_or_repo_id, model, adapter_name=adapter_name, is_trainable=is_trainable,
                                 reft_model_class=cls, **hub_kwargs)
        if not getattr(loaded, "_head_loaded", False):
            raise CheckpointError(
                f"{path_or_repo_id} holds no classification head (it was saved from a plain ReftModel); "
                "load it with ReftModel.from_pretrained"
            )
        loaded.classifier.requires_grad_(is_trainable)
        return loaded


def _head_options(tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The saved head options (``num_labels``, ``pooling``, ``problem_type``, maybe ``dropout``), checked.

    ``None`` when nothing was saved for a head. Options come by name from the config; older
    files hold indices into :data:`POOLING_MODES` / :data:`PROBLEM_TYPES` in a tensor instead.
    """
    saved = config.get("classifier") if isinstance(config, Mapping) else None
    if saved is None:
        if _HEAD_CONFIG_KEY not in tensors:
            return None
        try:
            num_labels, pooling, problem = (int(x) for x in tensors[_HEAD_CONFIG_KEY].tolist())
            saved = {"num_labels": num_labels, "pooling": POOLING_MODES[pooling], "problem_type": PROBLEM_TYPES[problem]}
        except (ValueError, IndexError, TypeError) as exc:
            raise CheckpointError(f"the saved classification head options are corrupted ({exc})") from exc
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"the saved classification head options are {saved!r}; expected a JSON object")
    options = dict(saved)
    num_labels = options.get("num_labels")
    if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
        raise CheckpointError(f"the saved classification head has num_labels={num_labels!r}; expected an integer >= 1")
    if options.get("pooling") not in POOLING_MODES:
        raise CheckpointError(f"the saved classification head has pooling={options.get('pooling')!r}; "
                              f"this reftlib knows {list(POOLING_MODES)}")
    if options.get("problem_type") not in PROBLEM_TYPES:
        raise CheckpointError(f"the saved classification head has problem_type={options.get('problem_type')!r}; "
                              f"this reftlib knows {list(PROBLEM_TYPES)}")
    dropout = options.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise CheckpointError(f"the saved classification head has dropout={dropout!r}; expected a number in [0, 1)")
    return options


def _last_hidden_state(outputs: Any) -> torch.Tensor:
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None:
        hidden = outputs[0]
    return hidden


def get_reft_model_for_sequence_classification(
    model: nn.Module,
    config: ReftConfig | Mapping | Sequence,
    num_labels: int | None = None,
    *,
    pooling: str = "auto",
    classifier_dropout: float = 0.0,
    problem_type: str | None = None,
    disable_model_grads: bool = True,
    adapter_name: str = DEFAULT_ADAPTER,
) -> ReftModelForSequenceClassification:
    """Attach interventions and a trainable classification head to ``model`` (any HF model).

    ``num_labels`` defaults to ``model.config.num_labels``; ``num_labels=1`` means regression. The
    base model is frozen; the interventions and the head are trainable.
    """
    require_model(model, "model", "get_reft_model_for_sequence_classification")
    if not isinstance(config, ReftConfig):
        config = ReftConfig(representations=config)
    if disable_model_grads:
        for param in model.parameters():
            param.requires_grad_(False)
    return ReftModelForSequenceClassification(
        model, config, adapter_name=adapter_name, num_labels=num_labels, pooling=pooling,
        classifier_dropout=classifier_dropout, problem_type=problem_type,
    )
