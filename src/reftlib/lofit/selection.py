"""LoFiT step 1: learn a scale for every attention head with an L1 penalty, rank heads by its norm.

Every head ``h`` of every layer gets ``A_h of size head_dim`` (``z_h ← (1 + A_h) ⊙ z_h``, a
:class:`~reftlib.HeadScaleIntervention` at ``head_output``, every position), initialised near zero.
The scales are trained on the task with ``loss + λ·Σ|A|``; the L1 term pushes the scales of heads
that do not help towards zero, so ``‖A_h‖₂`` ranks the heads. The ``K`` best heads over all layers
are kept (LoFiT: ~3 % of the heads; 10 % in its comparison with PEFT methods).

:func:`select_heads` detaches its interventions when done: the model comes back clean (same
hooks, same ``requires_grad`` flags, same train/eval mode) for step 2, :func:`~reftlib.lofit.tune_offsets`.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainingArguments, set_seed

from ..checks import require_model, require_tokenizer
from ..components import find_layers, resolve_site
from ..config import ReftConfig
from ..errors import CheckpointError, InputError, ReftConfigError
from ..interventions import HeadBiasIntervention, HeadScaleIntervention
from ..io import atomic_write_bytes
from ..model import ReftModel, get_reft_model
from ..training.dpo import ReftDPOTrainer
from ..training.trainer import ReftTrainerForCausalLM
from ._fit import fit
from .plot import plot_head_scores

__all__ = [
    "HeadScaleDPOTrainer",
    "HeadScaleTrainer",
    "HeadSelection",
    "L1PenaltyMixin",
    "count_heads",
    "lofit_config",
    "select_heads",
]

SELECTION_NAME = "head_selection.json"
_FORMAT = "reftlib-head-selection"
_FORMAT_VERSION = 1

Head = tuple[int, int]


# --------------------------------------------------------------------------- trainers with the L1 term
class L1PenaltyMixin:
    """Adds ``l1_lambda · Σ|A|`` over the trained :class:`~reftlib.HeadScaleIntervention` scales to the loss.

    The term is added inside ``compute_loss`` (so it is part of the logged loss, of the gradient
    and of evaluation). When the task loss is normalized over the whole accumulated batch
    (``num_items_in_batch``, the causal-LM trainer), the Trainer does not divide by the
    accumulation steps, so the penalty is divided here instead: with any accumulation, one
    optimizer step sees the penalty exactly once.
    """

    l1_lambda: float

    def __init__(self, *args: Any, l1_lambda: float = 1e-3, **kwargs: Any) -> None:
        if not (isinstance(l1_lambda, (int, float)) and l1_lambda >= 0):
            raise ReftConfigError(f"l1_lambda must be a non-negative number, got {l1_lambda!r}")
        super().__init__(*args, **kwargs)
        self.l1_lambda = float(l1_lambda)

    def l1_penalty(self) -> torch.Tensor:
        """``Σ|A|`` over the scales of the active head-scale interventions (a differentiable scalar)."""
        scales = [iv.scale for iv in self.reft_model.interventions.values() if isinstance(iv, HeadScaleIntervention)]
        if not scales:
            raise ReftConfigError("the L1 penalty needs HeadScaleIntervention(s); this model has none active")
        return sum(scale.abs().sum() for scale in scales)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        if self.l1_lambda:
            penalty = self.l1_lambda * self.l1_penalty()
            if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
                penalty = penalty / getattr(self, "current_gradient_accumulation_steps", 1)
            loss = loss + penalty.to(loss.device)
        return (loss, outputs) if return_outputs else loss


class HeadScaleTrainer(L1PenaltyMixin, ReftTrainerForCausalLM):
    """LoFiT step 1 with cross-entropy: :class:`~reftlib.training.ReftTrainerForCausalLM` plus the L1 term."""


class HeadScaleDPOTrainer(L1PenaltyMixin, ReftDPOTrainer):
    """LoFiT step 1 with DPO: :class:`~reftlib.lofit.ReftDPOTrainer` plus the L1 term."""


# --------------------------------------------------------------------------- the selection
@dataclass
class HeadSelection:
    """The result of :func:`select_heads`: head scores and the top-``k`` heads.

    Attributes:
        scores: ``[num_layers, num_heads]`` float tensor, ``‖A_h‖₂`` per head (higher = more important).
        k: number of heads kept.
        settings: how the scores were obtained (hyperparameters, model type, final loss).
    """

    scores: torch.Tensor
    k: int
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = torch.as_tensor(self.scores, dtype=torch.float32).detach().cpu()
        if self.scores.dim() != 2:
            raise ReftConfigError(f"scores must be [num_layers, num_heads], got shape {tuple(self.scores.shape)}")
        total = self.scores.numel()
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 1 <= self.k <= total:
            raise ReftConfigError(f"k must be an integer from 1 to {total} (the number of heads), got {self.k!r}")

    @property
    def num_layers(self) -> int:
        return int(self.scores.shape[0])

    @property
    def num_heads(self) -> int:
        """Heads per layer."""
        return int(self.scores.shape[1])

    def ranking(self) -> list[Head]:
        """Every ``(layer, head)``, best first (ties: lower layer, then lower head first)."""
        order = torch.argsort(self.scores.flatten(), descending=True, stable=True).tolist()
        return [(i // self.num_heads, i % self.num_heads) for i in order]

    @property
    def heads(self) -> list[Head]:
        """The top-``k`` heads as ``(layer, head)``, best first."""
        return self.ranking()[: self.k]

    @property
    def head_scores(self) -> list[float]:
        """The scores of :attr:`heads`, in the same order."""
        return [float(self.scores[layer, head]) for layer, head in self.heads]

    def by_layer(self) -> dict[int, list[int]]:
        """``layer -> sorted head indices`` of the selected heads (layers in increasing order)."""
        result: dict[int, list[int]] = {}
        for layer, head in sorted(self.heads):
            result.setdefault(layer, []).append(head)
        return result

    def top(self, k: int | None = None, *, fraction: float | None = None) -> HeadSelection:
        """The same scores with another number of heads (``k`` heads or a ``fraction`` of all heads)."""
        return HeadSelection(self.scores.clone(), _resolve_k(k, fraction, self.scores.numel()), dict(self.settings))

    def to_reft_config(self, init_std: float = 1e-3) -> ReftConfig:
        """The step-2 config: one :class:`~reftlib.HeadBiasIntervention` per layer with selected heads."""
        return lofit_config(self.heads, init_std=init_std)

    def plot(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Save the layer x head score heatmap (selected heads marked) as an image; needs matplotlib."""
        return plot_head_scores(self.scores, path, selected=self.heads, title=title)

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the scores, ``k``, the heads and the settings as JSON (a folder gets ``head_selection.json``).

        Scores are stored as exact float32 values; the file is written atomically.
        """
        target = _selection_file(Path(path), for_writing=True)
        data = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "k": self.k,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "heads": [list(h) for h in self.heads],
            "scores": self.scores.tolist(),
            "settings": _jsonable(self.settings),
        }
        atomic_write_bytes(target, (json.dumps(data, indent=1) + "\n").encode())
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> HeadSelection:
        """Read a selection written by :meth:`save` (a file, or a folder holding ``head_selection.json``)."""
        source = _selection_file(Path(path), for_writing=False)
        try:
            data = json.loads(source.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read the head selection in {source}: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise CheckpointError(f"{source} is not a reftlib head selection (no format {_FORMAT!r})")
        if data.get("format_version", 0) > _FORMAT_VERSION:
            raise CheckpointError(f"{source} was written by a newer reftlib; upgrade with `pip install -U reftlib`")
        try:
            selection = cls(torch.tensor(data["scores"], dtype=torch.float32), int(data["k"]), data.get("settings", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{source} is incomplete or corrupted: {exc}") from exc
        if [list(h) for h in selection.heads] != data.get("heads"):
            raise CheckpointError(f"{source}: the stored heads do not match the stored scores; the file was edited")
        return selection

    def __repr__(self) -> str:
        shown = ", ".join(f"({layer}, {head})" for layer, head in self.heads[:8])
        more = ", ..." if self.k > 8 else ""
        return f"HeadSelection(k={self.k} of {self.scores.numel()} heads [{self.num_layers}x{self.num_heads}]: {shown}{more})"


def _selection_file(path: Path, *, for_writing: bool) -> Path:
    if path.suffix == ".json":
        return path
    if path.is_dir() or for_writing:
        return path / SELECTION_NAME
    raise CheckpointError(f"{path} is neither a .json file nor a folder holding {SELECTION_NAME}")


def _jsonable(value: Any) -> Any:
    """``value`` with tensors/tuples/other objects turned into JSON types (settings are informational)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _resolve_k(k: int | None, fraction: float | None, total: int) -> int:
    if k is not None and fraction is not None:
        raise ReftConfigError("give k (a number of heads) or fraction (of all heads), not both")
    if k is None:
        fraction = 0.03 if fraction is None else fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise ReftConfigError(f"fraction must be in (0, 1], got {fraction!r}")
        k = max(1, math.floor(total * fraction + 0.5))
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= total:
        raise ReftConfigError(f"k must be an integer from 1 to {total} (the model's number of heads), got {k!r}")
    return k


# --------------------------------------------------------------------------- helpers on models
def count_heads(model: nn.Module) -> tuple[int, int]:
    """``(num_layers, heads_per_layer)`` of the attention heads at ``head_output``."""
    require_model(model, "model", "count_heads")
    _, layers = find_layers(model)
    site = resolve_site(model, 0, "head_output")
    return len(layers), int(site.num_heads)


def _normalize_heads(heads: HeadSelection | Mapping[int, Iterable[int]] | Iterable[Sequence[int]]) -> dict[int, list[int]]:
    if isinstance(heads, HeadSelection):
        return heads.by_layer()
    if isinstance(heads, Mapping):
        pairs = [(layer, head) for layer, hs in heads.items() for head in hs]
    else:
        pairs = list(heads)
    result: dict[int, list[int]] = {}
    for item in pairs:
        if not (isinstance(item, Sequence) and len(item) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                      for x in item)):
            raise ReftConfigError(f"heads must be (layer, head) integer pairs, got {item!r}")
        layer, head = item
        if head in result.setdefault(layer, []):
            raise ReftConfigError(f"head ({layer}, {head}) is listed twice")
        result[layer].append(head)
    if not result:
        raise ReftConfigError("no heads given; pass a HeadSelection or a list of (layer, head) pairs")
    return {layer: sorted(hs) for layer, hs in sorted(result.items())}


def lofit_config(heads: HeadSelection | Mapping[int, Iterable[int]] | Iterable[Sequence[int]], *,
                 init_std: float = 1e-3) -> ReftConfig:
    """LoFiT step-2 config: a :class:`~reftlib.HeadBiasIntervention` on the selected heads of each layer.

    Component ``head_output``, ``positions=None`` (every token), so the offsets fold exactly into
    the attention output projection (:func:`~reftlib.lofit.merge_and_unload`).
    """
    reps = [
        {"layer": layer, "component": "head_output", "positions": None,
         "intervention": HeadBiasIntervention(heads=hs, init_std=init_std)}
        for layer, hs in _normalize_heads(heads).items()
    ]
    return ReftConfig(representations=reps)


# --------------------------------------------------------------------------- step 1
def _special_token_ids(model: nn.Module) -> list[tuple[Any, str, Any]]:
    """The special-token ids of the model's (text) config and generation config, to restore later."""
    owners = [model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config,
              getattr(model, "generation_config", None)]
    return [(owner, name, copy.deepcopy(getattr(owner, name, None)))
            for owner in owners if owner is not None
            for name in ("eos_token_id", "bos_token_id", "pad_token_id")]


def select_heads(
    model: nn.Module,
    tokenizer: Any,
    train_data: Any,
    k: int | None = None,
    *,
    fraction: float | None = None,
    l1: float = 1e-3,
    lr: float = 1e-3,
    epochs: float = 5,
    batch_size: int = 8,
    objective: str | None = None,
    beta: float = 0.1,
    init_std: float = 1e-3,
    seed: int = 42,
    max_length: int | None = None,
    training_args: Mapping[str, Any] | TrainingArguments | None = None,
) -> HeadSelection:
    """LoFiT step 1: train a scale on every head with an L1 penalty and keep the ``k`` best heads.

    Args:
        model: a Hugging Face causal LM (any architecture with a ``head_output`` site: grouped-query
            attention and ``head_dim`` from the config are handled).
        tokenizer: its tokenizer (needs a pad token; ``tokenizer.pad_token = tokenizer.eos_token`` is fine).
        train_data: ``(prompt, answer)`` pairs (cross-entropy on the answer) or ``(prompt, chosen,
            rejected)`` triples (DPO, reference = the model without interventions). See
            :mod:`reftlib.lofit.data`.
        k: number of heads to keep; or ``fraction`` of all heads (default 3 %, rounded).
        l1: the L1 weight λ on ``Σ|A|``. lr, epochs, batch_size: optimizer settings (LoFiT: lr
            5e-4…5e-3, λ 5e-4…5e-3, 5 epochs, batch 8).
        objective: ``"sft"`` or ``"dpo"``; by default chosen from the form of ``train_data``.
        beta: DPO temperature. init_std: std of the initial scales. seed: for init and data order.
        max_length: longest example in tokens (default: the tokenizer's/model's limit).
        training_args: extra ``TrainingArguments`` fields (e.g. ``{"bf16": True, "logging_steps": 5}``)
            or a complete ``TrainingArguments``.

    Returns:
        a :class:`HeadSelection` (``.heads``, ``.scores``, ``.plot(path)``, ``.save(path)``). The model
        is left as it was: the scale interventions are detached.
    """
    require_model(model, "model", "select_heads")
    require_tokenizer(tokenizer, "tokenizer", "select_heads")
    num_layers, num_heads = count_heads(model)
    k = _resolve_k(k, fraction, num_layers * num_heads)
    if not (isinstance(l1, (int, float)) and l1 >= 0):
        raise ReftConfigError(f"l1 must be a non-negative number, got {l1!r}")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    # Trainer.train() aligns the config's special tokens with the tokenizer's; step 1 changes nothing.
    token_ids = _special_token_ids(model)
    set_seed(seed)
    config = ReftConfig(representations=[
        {"layer": layer, "component": "head_output", "positions": None,
         "intervention": HeadScaleIntervention(init_std=init_std)}
        for layer in range(num_layers)
    ])
    reft_model: ReftModel | None = None
    try:
        reft_model = get_reft_model(model, config)
        trainer = fit(
            reft_model, tokenizer, train_data, objective=objective, lr=lr, epochs=epochs, batch_size=batch_size,
            seed=seed, beta=beta, max_length=max_length, training_args=training_args,
            sft_trainer=HeadScaleTrainer, dpo_trainer=HeadScaleDPOTrainer, trainer_kwargs={"l1_lambda": l1},
        )
        scores = torch.stack([rep.intervention.head_scores().cpu() for rep in config.representations])
    finally:
        if reft_model is not None:
            reft_model.detach()
        for param, flag in flags:
            param.requires_grad_(flag)
        model.train(was_training)
        for owner, name, value in token_ids:
            setattr(owner, name, value)
    if not bool(torch.isfinite(scores).all()):
        raise InputError("head selection produced non-finite scores; lower lr or l1 (the training diverged)")
    losses = [entry["train_loss"] for entry in trainer.state.log_history if "train_loss" in entry]
    settings = {
        "method": "lofit",
        "objective": "dpo" if isinstance(trainer, ReftDPOTrainer) else "sft",
        "l1": l1, "lr": lr, "epochs": epochs, "batch_size": batch_size, "beta": beta, "init_std": init_std,
        "seed": seed, "model_type": getattr(model.config, "model_type", None),
        "model_name_or_path": getattr(model.config, "_name_or_path", None) or None,
        "train_examples": len(trainer.train_dataset), "steps": trainer.state.global_step,
        "train_loss": losses[-1] if losses else None,
    }
    return HeadSelection(scores, k, settings)
