"""Reading pyreft's saved intervention tensors: the pieces each intervention's ``from_pyreft_state`` uses.

pyreft (through pyvene) saves each intervention's ``state_dict()`` in an ``intkey_<key>.bin`` file.
The rotation ``R`` appears in one of three forms (LoReFT's compact ``rotate_layer``, torch's
``orthogonal`` parametrization, or a plain ``rotate_layer.weight``); :func:`rotation_from_pyreft`
reads any of them into reftlib's basis. Every problem is a :class:`~reftlib.errors.CheckpointError`
naming the file (``where``) and what it holds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import CheckpointError
from .rotation import raw_from_columns

__all__ = ["BOOKKEEPING_KEYS", "check_orthonormal", "evaluate_orthogonal", "pyreft_rotation", "require_tensor",
           "rotation_from_pyreft"]

logger = logging.getLogger(__name__)

#: pyvene buffers saved with every intervention (not parameters).
BOOKKEEPING_KEYS = frozenset({"embed_dim", "interchange_dim"})
_ROTATION_PREFIX = "rotate_layer"
_PARAMETRIZED = ("rotate_layer.parametrizations.weight.original", "rotate_layer.parametrizations.weight.0.base")


def rotation_from_pyreft(state: Mapping[str, torch.Tensor], where: object) -> tuple[torch.Tensor, set[str], int, int]:
    """``(raw, keys read, embed_dim, rank)``: pyreft's rotation as reftlib's ``rotate_layer.raw`` (format version 2)."""
    rotation = pyreft_rotation(state, where)
    check_orthonormal(rotation, where)
    embed_dim, rank = rotation.shape
    return raw_from_columns(rotation), {_ROTATION_PREFIX, "rotate_layer.weight", *_PARAMETRIZED}, int(embed_dim), int(rank)


def pyreft_rotation(state: Mapping[str, torch.Tensor], where: object) -> torch.Tensor:
    """pyreft's ``R`` as a ``[d, r]`` matrix with orthonormal columns."""
    if _ROTATION_PREFIX in state:  # LoReFT's compact format: R itself
        return state[_ROTATION_PREFIX].float()
    if all(k in state for k in _PARAMETRIZED):
        original, base = (state[k].float() for k in _PARAMETRIZED)
        return evaluate_orthogonal(original, base, where)
    if "rotate_layer.weight" in state:  # an unparametrized LowRankRotateLayer
        return state["rotate_layer.weight"].float()
    raise CheckpointError(
        f"{where} has no rotation (expected 'rotate_layer' or '{_PARAMETRIZED[0]}' + '{_PARAMETRIZED[1]}'); "
        f"keys: {sorted(state)}"
    )


def check_orthonormal(rotation: torch.Tensor, where: object) -> None:
    """Warn when R's columns are not orthonormal: reftlib would orthonormalize them, changing outputs."""
    if rotation.dim() != 2 or rotation.shape[1] > rotation.shape[0]:
        raise CheckpointError(f"{where}: rotation has shape {tuple(rotation.shape)}; expected [d, r] with r <= d")
    gram = rotation.T @ rotation
    deviation = (gram - torch.eye(gram.shape[0])).abs().max().item()
    if not deviation <= 1e-2:
        logger.warning(
            "%s: the rotation's columns are not orthonormal (max |R^T R - I| = %.3g); reftlib orthonormalizes "
            "it, so outputs will differ from pyreft's", where, deviation,
        )


def evaluate_orthogonal(original: torch.Tensor, base: torch.Tensor, where: object) -> torch.Tensor:
    """Rebuild torch's ``orthogonal`` parametrization (as pyreft registers it) and read its weight."""
    if original.dim() != 2 or base.shape != (original.shape[0], original.shape[0]):
        raise CheckpointError(
            f"{where}: rotation parametrization has shapes {tuple(original.shape)} and {tuple(base.shape)}; "
            "expected [d, r] and [d, d]"
        )
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.empty_like(original))
    nn.init.orthogonal_(holder.weight)
    nn.utils.parametrizations.orthogonal(holder)
    try:
        holder.load_state_dict(
            {"parametrizations.weight.original": original, "parametrizations.weight.0.base": base}, strict=True
        )
    except RuntimeError as exc:
        raise CheckpointError(f"{where}: cannot rebuild the orthogonal rotation ({exc})") from exc
    with torch.no_grad():
        return holder.weight.detach().clone()


def require_tensor(state: Mapping[str, torch.Tensor], key: str, where: object) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{where} lacks tensor {key!r}; keys: {sorted(state)}")
    return state[key]
