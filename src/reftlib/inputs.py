"""Checking what a forward or generate call is given: shapes, masks, lengths.

Every check raises :class:`~reftlib.errors.InputError` naming the problem and the fix, before the
inputs reach the model (where they would fail with an index error deep inside, or silently give
garbage: positions past the model's position table).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .errors import InputError

__all__ = ["as_input_dict", "attention_mask_of", "check_length", "input_device", "input_length", "max_positions"]


def as_input_dict(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """A plain dict copy of a tokenizer's ``BatchEncoding`` or any mapping of model inputs."""
    if not hasattr(inputs, "items"):
        raise InputError(f"model inputs must be a dict such as tokenizer(..., return_tensors='pt'), got {type(inputs).__name__}")
    return dict(inputs.items())


def _token_tensor(inputs: Mapping[str, Any]) -> torch.Tensor:
    ids = inputs.get("input_ids")
    name = "input_ids"
    if ids is None:
        ids, name = inputs.get("inputs_embeds"), "inputs_embeds"
    if ids is None:
        raise InputError("pass input_ids (or inputs_embeds) to the model")
    if not isinstance(ids, torch.Tensor):
        raise InputError(
            f"{name} must be a torch tensor [batch, seq_len], got {type(ids).__name__}; "
            "tokenize with return_tensors='pt' (or wrap the ids in torch.tensor([...]))"
        )
    return ids


def input_length(inputs: Mapping[str, Any]) -> int:
    """The number of tokens in this call's ``input_ids`` (or ``inputs_embeds``)."""
    return _token_tensor(inputs).shape[1]


def attention_mask_of(inputs: Mapping[str, Any]) -> torch.Tensor:
    """The call's ``[batch, seq_len]`` attention mask (all ones when none is given), checked against the ids."""
    ids = _token_tensor(inputs)
    if ids.dim() < 2:
        raise InputError(f"input_ids must be [batch, seq_len], got shape {tuple(ids.shape)}; add a batch dimension")
    if ids.shape[0] == 0:
        raise InputError("the batch is empty (0 rows); pass at least one example")
    mask = inputs.get("attention_mask")
    if mask is None:
        return torch.ones(ids.shape[:2], dtype=torch.long)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or mask.shape[0] != ids.shape[0]:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise InputError(f"attention_mask shape {shape} does not match input_ids shape {tuple(ids.shape[:2])}")
    return mask


def input_device(inputs: Mapping[str, Any]) -> torch.device:
    """Where the call's token tensor lives."""
    return _token_tensor(inputs).device


def max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows (``max_position_embeddings`` or its aliases), if known."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_length(model: nn.Module, length: int, what: str) -> None:
    """Refuse sequences longer than the model's position table (an index error or silent garbage otherwise)."""
    limit = max_positions(model)
    if limit is not None and length > limit:
        raise InputError(
            f"{what} has {length} tokens but the model handles at most {limit} (config.max_position_embeddings); "
            f"truncate it, e.g. tokenizer(..., truncation=True, max_length={limit})"
        )
