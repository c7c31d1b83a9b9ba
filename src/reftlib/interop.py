"""Converting checkpoints written by pyreft / pyvene (``config.json`` + ``intkey_*.bin``) to reftlib folders.

``ReftModel.from_pretrained(folder, model)`` recognizes a pyreft save folder by itself and
converts it on the fly; :func:`convert_pyreft_checkpoint` writes a reftlib folder once, so that
later loads read safetensors only.

The format itself (what a pyreft folder holds, how each intervention class maps to reftlib's,
what is assumed where pyreft saves nothing) is read by :mod:`reftlib.pyreft_format`; its public
names (:func:`read_pyreft_folder`, :func:`is_pyreft_folder`, :data:`PYREFT_INTERVENTION_TYPES`,
:data:`PYREFT_COMPONENTS`) are importable from here too. This module writes through
:mod:`reftlib.io`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .config import DEFAULT_ADAPTER, ReftConfig, intervention_from_config
from .errors import CheckpointError, ReftConfigError
from .io import attach_adapter, write_adapter_files
from .model import ReftModel
from .pyreft_format import (
    PYREFT_COMPONENTS,
    PYREFT_INTERVENTION_TYPES,
    is_pyreft_folder,
    read_pyreft_folder,
    with_positions,
)

__all__ = [
    "PYREFT_COMPONENTS",
    "PYREFT_INTERVENTION_TYPES",
    "convert_pyreft_checkpoint",
    "is_pyreft_folder",
    "read_pyreft_folder",
]


def convert_pyreft_checkpoint(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    act_fn: str | None = None,
    positions: str | None = None,
) -> Path:
    """Convert a pyreft save folder into a reftlib folder (``reft_config.json`` + safetensors).

    Without ``model`` the interventions are rebuilt from the checkpoint alone (every shape is
    checked against the config). With ``model`` they are also attached to it once, which
    checks that they fit and records the model's type and name in the config; the model is
    returned to its original state (hooks removed, ``requires_grad`` flags restored).

    Args:
        src_dir: the folder written by ``pyreft.ReftModel.save``.
        dst_dir: where to write the reftlib folder (created if needed).
        model: optionally, the base model the interventions were trained on.
        dtype: dtype of the converted interventions (default ``float32``, lossless).
        act_fn: activation for LoReFT/NoReFT/DiReFT/NodiReFT (pyreft does not save it; default linear).
        positions: the token positions the interventions were trained at, e.g. ``"f1+l1"`` (pyreft
            does not save them; default: none recorded, so every call must pass positions, and
            ``generate``/serving act on every position). Recorded for every intervention.

    Returns:
        ``dst_dir`` as a :class:`~pathlib.Path`, loadable with ``ReftModel.from_pretrained(dst_dir, model)``.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    config, tensors = read_pyreft_folder(src, dtype=dtype, act_fn=act_fn)
    if positions is not None:
        config = with_positions(config, positions)  # a PositionError names a malformed spec
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst} exists and is not a folder; choose another destination")
    if model is not None:
        flags = [(p, p.requires_grad) for p in model.parameters()]
        reft_model = ReftModel(model)
        try:
            attach_adapter(reft_model, DEFAULT_ADAPTER, config, tensors, where=src)
            reft_model.save_pretrained(dst)
        finally:
            reft_model.detach()
            for param, flag in flags:
                param.requires_grad_(flag)
        return dst
    try:
        canonical = ReftConfig.from_dict(config)  # builds every intervention: validates the config
    except ReftConfigError as exc:
        raise CheckpointError(f"cannot convert {src}: {exc}") from exc
    modules = nn.ModuleDict({rep.name: intervention_from_config(rep.intervention.get_config())
                             for rep in canonical.representations})
    try:
        modules.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"cannot convert {src}: tensors do not match the config ({exc})") from exc
    write_adapter_files(dst, canonical.to_dict(), modules.state_dict())
    return dst
