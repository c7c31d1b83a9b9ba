"""Adapter tensors in memory: their names, and reading or replacing them on a live model.

An adapter's tensors are named ``<intervention key>.<parameter>`` (what
:func:`get_adapter_state_dict` returns and a saved ``reft_model.safetensors`` holds); in
``reft_model.state_dict()`` the same tensors are named ``adapters.<adapter name>.<intervention
key>.<parameter>`` (:func:`state_dict_key`). Extra tensors of a model subclass (e.g. a
classification head) are saved with the root adapter under the ``__extra__.`` prefix
(:func:`split_extra` separates them). Everything here is re-exported by :mod:`reftlib.io`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from .config import DEFAULT_ADAPTER
from .errors import AdapterError, CheckpointError, ReftConfigError

if TYPE_CHECKING:
    from .model import ReftModel

__all__ = [
    "EXTRA_PREFIX",
    "adapter_modules",
    "get_adapter_state_dict",
    "set_adapter_state_dict",
    "split_extra",
    "state_dict_key",
    "state_dict_mismatch",
]

#: Prefix of a model subclass's extra tensors (e.g. ``__extra__.classifier.weight``) in a saved file.
EXTRA_PREFIX = "__extra__."


def state_dict_key(adapter_name: str, key: str = "") -> str:
    """The name of adapter tensor ``key`` (``<intervention key>.<parameter>``) in ``reft_model.state_dict()``.

    ``state_dict_key("default", "layer_1_block_output.learned_source.bias")`` is
    ``"adapters.default.layer_1_block_output.learned_source.bias"``; with ``key=""`` it is the
    prefix shared by all the adapter's tensors. Adapter and intervention names hold no dots,
    so the prefix is unambiguous.
    """
    return f"adapters.{adapter_name}.{key}"


def split_extra(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(intervention tensors, extra tensors)`` of a saved file; the extras lose their ``__extra__.`` prefix."""
    plain = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}
    extra = {k.removeprefix(EXTRA_PREFIX): v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}
    return plain, extra


def adapter_modules(reft_model: ReftModel, adapter_name: str) -> torch.nn.Module:
    """The ``ModuleDict`` of adapter ``adapter_name`` (its interventions by key); an :class:`AdapterError` if unknown."""
    if not isinstance(adapter_name, str) or adapter_name not in reft_model.adapters:
        raise AdapterError(f"unknown adapter {adapter_name!r}; this model has adapters {reft_model.adapter_names}")
    return reft_model.adapters[adapter_name]


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], tensors: Mapping[str, Any]) -> str | None:
    """Why ``tensors`` cannot replace ``expected`` (missing / unexpected names, shapes), or ``None``."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        return f"tensors do not match the config (missing {missing}, unexpected {unexpected})"
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            return f"{key} is a {type(value).__name__}, not a tensor"
        if tuple(expected[key].shape) != tuple(value.shape):
            return f"tensor {key} has shape {tuple(value.shape)} but this model needs {tuple(expected[key].shape)}"
    return None


def _from_full_state_dict(state_dict: Mapping[str, Any], adapter_name: str) -> dict[str, Any] | None:
    """The entries of adapter ``adapter_name`` in a full ``reft_model.state_dict()``, or ``None`` if it has none."""
    prefix = state_dict_key(adapter_name)
    if not any(isinstance(k, str) and k.startswith(prefix) for k in state_dict):
        return None
    return {k[len(prefix):]: v for k, v in state_dict.items() if isinstance(k, str) and k.startswith(prefix)}


def get_adapter_state_dict(reft_model: ReftModel, adapter_name: str = DEFAULT_ADAPTER,
                           state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one adapter, keyed ``<intervention key>.<parameter>`` (as saved), on the CPU.

    Args:
        reft_model: the model holding the adapter.
        adapter_name: which adapter.
        state_dict: optionally a full state dict of ``reft_model`` (the keys of
            ``reft_model.state_dict()``, as FSDP or DeepSpeed gather it): the adapter's tensors are
            taken from its ``adapters.<adapter_name>.*`` entries instead of the live modules, and
            every other entry (``model.*`` base weights, other adapters) is ignored. They are cast
            to the dtype of the live parameters, so the file matches its config.

    Raises:
        AdapterError: no adapter of that name.
        ReftConfigError: ``state_dict`` lacks tensors of the adapter or has them in other shapes.
    """
    live = adapter_modules(reft_model, adapter_name).state_dict()
    if state_dict is None:
        return {name: tensor.detach().contiguous().cpu() for name, tensor in live.items()}
    if not isinstance(state_dict, Mapping):
        raise ReftConfigError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    taken = _from_full_state_dict(state_dict, adapter_name)
    if taken is None:
        sample = sorted(str(k) for k in state_dict)[:3]
        raise ReftConfigError(
            f"state_dict holds no tensors of adapter {adapter_name!r} (no key starts with "
            f"{state_dict_key(adapter_name)!r}; first keys: {sample}); pass the full state dict of this ReftModel "
            "(reft_model.state_dict(), or what FSDP/DeepSpeed gathered from it)"
        )
    expected = dict(live)
    for name, param in adapter_modules(reft_model, adapter_name).named_parameters():
        if hasattr(param, "ds_shape"):  # partitioned by DeepSpeed ZeRO-3: the live tensor is an empty placeholder
            expected[name] = torch.empty(tuple(param.ds_shape), dtype=param.dtype, device="meta")
    problem = state_dict_mismatch(expected, taken)
    if problem:
        raise ReftConfigError(f"state_dict does not fit adapter {adapter_name!r}: {problem}")
    return {name: taken[name].detach().to(dtype=live[name].dtype).contiguous().cpu() for name in live}


def set_adapter_state_dict(reft_model: ReftModel, adapter_name: str, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy tensors into adapter ``adapter_name`` in place (the parameter objects stay; optimizers keep them).

    ``state_dict`` is either the adapter's own tensors (``<intervention key>.<parameter>``, as
    :func:`get_adapter_state_dict` returns and the safetensors file holds) or a full state dict
    of the model (``adapters.<adapter_name>.*`` entries are used, every other entry is ignored).
    Extra tensors of model subclasses (a classification head) are not touched.

    Raises:
        AdapterError: no adapter of that name.
        CheckpointError: names or shapes do not match the adapter's interventions (nothing is changed).
    """
    modules = adapter_modules(reft_model, adapter_name)
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    taken = _from_full_state_dict(state_dict, adapter_name)
    tensors = dict(state_dict) if taken is None else taken
    problem = state_dict_mismatch(modules.state_dict(), tensors)
    if problem:
        raise CheckpointError(f"adapter {adapter_name!r}: {problem}")
    modules.load_state_dict(tensors, strict=True)
