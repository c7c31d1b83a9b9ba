"""Saving and loading interventions: safetensors + JSON, atomic, never pickle.

This package's on-disk format is owned by this module and the three it re-exports (every name
below is importable from ``reftlib.io``): :mod:`reftlib.adapter_state` (tensor names, reading and
replacing an adapter's tensors), :mod:`reftlib.folders` (file names and reading saved folders)
and :mod:`reftlib.hub` (Hub repos and the model card); pyreft folders are read by
:mod:`reftlib.pyreft_format`. This module writes folders and loads them onto models; the
trainer's checkpoints, the pyreft converter and the command line all go through it.

Layout of a saved folder (PEFT-style)::

    reft_config.json          # the root adapter's ReftConfig (human readable copy)
    reft_model.safetensors    # its tensors; the config is also embedded in the metadata
    reft_adapters.json        # index of adapters when more than one is saved (or the root one is not "default")
    <adapter_name>/...        # the same two files for each other adapter

Tensor names inside ``reft_model.safetensors`` are ``<intervention key>.<parameter>`` (what
:func:`get_adapter_state_dict` returns); extra tensors of a model subclass (e.g. a
classification head) are stored with the root adapter under the ``__extra__.`` prefix, and
their options by name in the config's ``"extra"`` entry. In ``reft_model.state_dict()`` the
same tensors are named ``adapters.<adapter name>.<intervention key>.<parameter>``
(:func:`state_dict_key`).

Every file is written to a temporary name, flushed to disk and renamed over the old one
(``os.replace`` is atomic, see :mod:`reftlib.atomic`), so an interrupted save leaves the previous
save intact. The safetensors file is self-describing (its metadata holds the config), so a
folder is always loadable from that one file even if a crash separated it from its JSON copy.
Every reader checks the format version and refuses files written by a newer reftlib.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save as safetensors_dumps

from .adapter_state import (
    EXTRA_PREFIX,
    adapter_modules,
    get_adapter_state_dict,
    set_adapter_state_dict,
    split_extra,
    state_dict_key,
    state_dict_mismatch,
)
from .atomic import atomic_write_bytes
from .checks import registered_reft_model_class, require_model, require_reft_model
from .config import DEFAULT_ADAPTER, FORMAT_NAME, FORMAT_VERSION, ReftConfig
from .errors import AdapterError, CheckpointError, ReftConfigError, ReftError
from .folders import (
    CONFIG_METADATA_KEY,
    CONFIG_NAME,
    INDEX_NAME,
    WEIGHTS_NAME,
    check_format_version,
    holds_adapters,
    read_adapter,
    read_adapter_config,
    read_index,
    saved_adapters,
    upgrade_tensors,
)
from .hub import model_card, push_to_hub, resolve_folder
from .pyreft_format import PYREFT_CONFIG_NAME, is_pyreft_folder

if TYPE_CHECKING:
    from .model import ReftModel

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_NAME",
    "EXTRA_PREFIX",
    "INDEX_NAME",
    "PYREFT_CONFIG_NAME",
    "SAVE_PRETRAINED_ARGUMENTS",
    "WEIGHTS_NAME",
    "atomic_write_bytes",
    "attach_adapter",
    "check_format_version",
    "get_adapter_state_dict",
    "holds_adapters",
    "is_pyreft_folder",
    "load_adapter_into",
    "load_reft_model",
    "load_weights_in_place",
    "model_card",
    "push_to_hub",
    "read_adapter",
    "read_adapter_config",
    "read_index",
    "resolve_folder",
    "save_adapter",
    "save_reft_model",
    "saved_adapters",
    "set_adapter_state_dict",
    "split_extra",
    "state_dict_key",
    "upgrade_tensors",
    "write_adapter_files",
    "write_index",
]

#: The keyword arguments ``ReftModel.save_pretrained`` accepts (anything else is refused).
SAVE_PRETRAINED_ARGUMENTS = ("selected_adapters", "adapter_names", "is_main_process", "state_dict",
                             "safe_serialization")


# --------------------------------------------------------------------------- save
def write_index(folder: str | os.PathLike, adapters: Mapping[str, str], active: Sequence[str]) -> None:
    """Write ``reft_adapters.json`` (atomically): ``{adapter name: subfolder}`` and the active adapters."""
    index = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "adapters": dict(adapters),
        "active": list(active),
    }
    atomic_write_bytes(Path(folder) / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())


def write_adapter_files(directory: str | os.PathLike, config: Mapping[str, Any],
                        tensors: Mapping[str, torch.Tensor]) -> None:
    """Write one adapter folder: ``reft_model.safetensors`` (config embedded) then ``reft_config.json``.

    Each file is written atomically; the weights go first, so a crash in between leaves a
    self-describing new weights file next to the old JSON copy (readers prefer the embedded config).
    """
    directory = Path(directory)
    text = json.dumps(dict(config), indent=2)
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    blob = safetensors_dumps(data, metadata={"format": "pt", CONFIG_METADATA_KEY: text})
    atomic_write_bytes(directory / WEIGHTS_NAME, blob)
    atomic_write_bytes(directory / CONFIG_NAME, (text + "\n").encode())


def _subclass_method(reft_model: ReftModel, name: str) -> Any:
    """``reft_model.<name>`` when its class defines it (never an attribute forwarded from the base model)."""
    return getattr(reft_model, name) if callable(getattr(type(reft_model), name, None)) else None


def _extra_state(reft_model: ReftModel, state_dict: Mapping[str, torch.Tensor] | None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The extra tensors (prefixed) and options of a model subclass, e.g. a classification head.

    An extra tensor whose name is also a key of ``state_dict`` is taken from it (the head's
    tensors are named as in ``reft_model.state_dict()``).
    """
    tensors: dict[str, torch.Tensor] = {}
    extra_tensors = _subclass_method(reft_model, "extra_state_dict")
    if extra_tensors is not None:
        for key, value in extra_tensors().items():
            if state_dict is not None and key in state_dict:
                given = state_dict[key]
                if not isinstance(given, torch.Tensor) or tuple(given.shape) != tuple(value.shape):
                    raise ReftConfigError(f"state_dict[{key!r}] does not have the shape {tuple(value.shape)} of the "
                                          "model's tensor; pass the full state dict of this ReftModel")
                value = given.detach().to(dtype=value.dtype)
            tensors[EXTRA_PREFIX + key] = value.detach().contiguous().cpu()
    extra_config = _subclass_method(reft_model, "extra_config")
    return tensors, (extra_config() if extra_config is not None else None)


def save_adapter(reft_model: ReftModel, adapter_name: str, directory: str | os.PathLike, *,
                 state_dict: Mapping[str, torch.Tensor] | None = None, with_extra: bool = False) -> None:
    """Save one adapter's config and tensors into ``directory`` (atomically, file by file).

    ``with_extra`` also stores the model's extra tensors and options (e.g. a classification head).
    """
    config = reft_model.reft_configs[adapter_name].to_dict()
    tensors = get_adapter_state_dict(reft_model, adapter_name, state_dict)
    if with_extra:
        extra_tensors, extra_config = _extra_state(reft_model, state_dict)
        tensors.update(extra_tensors)
        if extra_config:
            config["extra"] = extra_config
    write_adapter_files(directory, config, tensors)


def _selected(reft_model: ReftModel, selected_adapters: Any, adapter_names: Any) -> list[str]:
    if selected_adapters is not None and adapter_names is not None \
            and list(_as_names(selected_adapters)) != list(_as_names(adapter_names)):
        raise ReftConfigError("give selected_adapters= or adapter_names= (its older name), not both")
    chosen = selected_adapters if selected_adapters is not None else adapter_names
    names = list(dict.fromkeys(_as_names(chosen))) if chosen is not None else reft_model.adapter_names
    if not names:
        raise ReftError("nothing to save: this ReftModel has no adapters" if chosen is None
                        else "selected_adapters is empty; name at least one adapter to save")
    for name in names:
        adapter_modules(reft_model, name)
    return names


def _as_names(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, Sequence):
        raise ReftConfigError(f"selected_adapters must be a list of adapter names, got {type(value).__name__}")
    return list(value)


def save_reft_model(reft_model: ReftModel, save_directory: str | os.PathLike, *,
                    selected_adapters: Sequence[str] | None = None, adapter_names: Sequence[str] | None = None,
                    is_main_process: bool = True, state_dict: Mapping[str, torch.Tensor] | None = None,
                    safe_serialization: bool = True, **unknown: Any) -> None:
    """Save adapters: the default (or first selected) one at the root, the others in subfolders.

    Args:
        selected_adapters: the adapters to write (default: all); ``adapter_names`` is its older name.
            The root holds ``"default"`` when selected, else the first one; an index
            (``reft_adapters.json``) lists them whenever the folder holds more than ``"default"``.
        is_main_process: ``False`` writes nothing (call it on every rank, only rank 0 saves).
        state_dict: a full state dict of ``reft_model`` (its ``state_dict()`` keys, e.g. the one
            FSDP gathers on every rank) to take the weights from instead of the live modules;
            ``model.*`` base weights in it are ignored.
        safe_serialization: must stay ``True``: reftlib writes safetensors only, never pickles.

    Raises:
        ReftConfigError: an unknown keyword argument, ``safe_serialization=False``, or a
            ``state_dict`` without the selected adapters' tensors. Nothing is written then.
        AdapterError: a selected adapter does not exist.
        CheckpointError: ``save_directory`` is a file.
    """
    if unknown:
        raise ReftConfigError(
            f"save_pretrained() got unknown argument(s) {sorted(unknown)}; it accepts {list(SAVE_PRETRAINED_ARGUMENTS)}"
        )
    if safe_serialization is not True:
        raise ReftConfigError(
            f"safe_serialization={safe_serialization!r}: reftlib writes only safetensors (never pickled .bin "
            "files); leave safe_serialization at True"
        )
    names = _selected(reft_model, selected_adapters, adapter_names)
    if state_dict is not None and not isinstance(state_dict, Mapping):
        raise ReftConfigError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    if not is_main_process:
        return
    root = Path(save_directory)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{root} exists and is not a folder; choose another save path")
    if state_dict is not None:  # check every adapter before writing anything
        for name in names:
            get_adapter_state_dict(reft_model, name, state_dict)
        _extra_state(reft_model, state_dict)
    root_name = DEFAULT_ADAPTER if DEFAULT_ADAPTER in names else names[0]
    for name in names:
        save_adapter(reft_model, name, root if name == root_name else root / name, state_dict=state_dict,
                     with_extra=name == root_name)
    if len(names) > 1 or root_name != DEFAULT_ADAPTER:
        write_index(root, {name: "." if name == root_name else name for name in names},
                    [n for n in reft_model.active_adapters if n in names])
    elif (root / INDEX_NAME).exists():
        os.unlink(root / INDEX_NAME)



# --------------------------------------------------------------------------- load
def _load_extra(reft_model: ReftModel, extra: Mapping[str, torch.Tensor], extra_config: Any) -> None:
    """Hand saved extra tensors and options (e.g. a classification head) to a model subclass that takes them."""
    load = _subclass_method(reft_model, "load_extra_state_dict")
    if load is None or not (extra or extra_config):
        return
    if extra_config is None:
        load(extra)
    else:
        load(extra, config=extra_config)


def attach_adapter(reft_model: ReftModel, adapter_name: str, config_dict: Mapping[str, Any],
                   tensors: Mapping[str, torch.Tensor], *, is_trainable: bool = False,
                   where: str | os.PathLike = "the checkpoint", activate: bool = True) -> None:
    """Add adapter ``adapter_name`` built from a saved ``(config dict, tensors)`` pair (see :func:`read_adapter`).

    The config's ``"extra"`` options and the ``__extra__.`` tensors go to the model's
    ``load_extra_state_dict`` when it has one. ``where`` names the source in error messages.

    Raises:
        CheckpointError: the config is invalid, does not fit the model, or the tensors do not match
            it (the adapter is not added then).
    """
    config_dict = dict(config_dict)
    extra_config = config_dict.pop("extra", None)
    try:
        config = ReftConfig.from_dict(config_dict)
    except ReftConfigError as exc:
        raise CheckpointError(f"cannot read the config in {where}: {exc}") from exc
    saved_type = config.base_model_type
    try:
        reft_model.add_adapter(adapter_name, config, set_active=activate)
    except ReftConfigError as exc:
        model_type = getattr(reft_model.model.config, "model_type", None)
        raise CheckpointError(
            f"the interventions in {where} do not fit this model ({model_type}; saved for {saved_type}, "
            f"{config.base_model_name_or_path}): {exc}"
        ) from exc
    tensors, extra = split_extra(tensors)
    problem = state_dict_mismatch(reft_model.adapters[adapter_name].state_dict(), tensors)
    if problem:
        reft_model.delete_adapter(adapter_name)
        raise CheckpointError(f"{where}: {problem}")
    set_adapter_state_dict(reft_model, adapter_name, tensors)
    _load_extra(reft_model, extra, extra_config)
    for param in reft_model.adapters[adapter_name].parameters():
        param.requires_grad_(is_trainable)


def load_reft_model(path_or_repo_id, model, *, adapter_name: str = DEFAULT_ADAPTER, is_trainable: bool = False,
                    reft_model_class=None, disable_model_grads: bool = True, **hub_kwargs: Any) -> ReftModel:
    """Build a :class:`ReftModel` on ``model`` from a saved folder or Hub repo.

    ``disable_model_grads=False`` keeps the base model's trainable parameters (e.g. LoRA) as they are.
    """
    require_model(model, "model", "load_reft_model")
    folder = resolve_folder(path_or_repo_id, **hub_kwargs)
    adapters, active = saved_adapters(folder, default_name=adapter_name)  # checks the index before any work
    if disable_model_grads:
        for param in model.parameters():
            param.requires_grad_(False)
    reft_model = (reft_model_class or registered_reft_model_class())(model)
    for name, sub in adapters.items():
        config, tensors = read_adapter(folder / sub)
        attach_adapter(reft_model, name, config, tensors, is_trainable=is_trainable, where=folder / sub)
    reft_model.set_adapter(active)
    if not is_trainable:
        for param in reft_model.adapters.parameters():
            param.requires_grad_(False)
        reft_model.eval()
    return reft_model


def load_adapter_into(reft_model: ReftModel, path_or_repo_id, adapter_name: str, *, is_trainable: bool = False,
                      **hub_kwargs: Any) -> None:
    """Add the adapter saved at ``path_or_repo_id`` to an existing model as ``adapter_name``."""
    require_reft_model(reft_model, "reft_model", "load_adapter_into")
    if adapter_name in reft_model.adapters:
        raise AdapterError(
            f"an adapter named {adapter_name!r} is already loaded; choose another adapter_name or delete_adapter() it"
        )
    folder = resolve_folder(path_or_repo_id, **hub_kwargs)
    index = read_index(folder)
    if index is not None:
        saved = index["adapters"]
        if adapter_name in saved:  # PEFT-style: the adapter saved under that name, from its subfolder
            folder = folder / saved[adapter_name]
        else:
            root = next((name for name, sub in saved.items() if sub == "."), None)
            logger.info("%s holds adapters %s; loading %r (the one at the root) as %r. Pass adapter_name=<saved "
                        "name> or subfolder=<name> for another one", folder, list(saved), root, adapter_name)
    config, tensors = read_adapter(folder)
    # Loading does not change which adapters are active (the first adapter of a model becomes active).
    attach_adapter(reft_model, adapter_name, config, tensors, is_trainable=is_trainable, where=folder,
                   activate=not reft_model.active_adapters)


def load_weights_in_place(reft_model: ReftModel, folder: str | os.PathLike) -> None:
    """Copy the tensors saved in ``folder`` into ``reft_model``'s existing adapters (resuming training).

    Unlike :func:`load_reft_model` this adds nothing: every adapter of the model that the folder
    holds is overwritten in place (parameter objects are kept, so optimizers still point at them),
    and the extra state (e.g. a classification head) is restored. All files are read and checked
    before any tensor is copied.

    Raises:
        CheckpointError: the folder holds no saved interventions, an adapter the model lacks, tensors
            that do not match the model's interventions, or files written by a newer reftlib.
    """
    root = Path(folder)
    if not ((root / WEIGHTS_NAME).is_file() or (root / INDEX_NAME).is_file()):
        raise CheckpointError(
            f"{root} holds no {WEIGHTS_NAME}; it is not a checkpoint written by a reftlib trainer "
            "(resume from a checkpoint-N folder of this run)"
        )
    default = DEFAULT_ADAPTER if DEFAULT_ADAPTER in reft_model.adapters else reft_model.adapter_names[0]
    adapters, _active = saved_adapters(root, default_name=default)
    loaded = []
    for name, sub in adapters.items():
        if name not in reft_model.adapters:
            raise CheckpointError(f"{root} has an adapter {name!r} that this model lacks ({reft_model.adapter_names})")
        config, tensors = read_adapter(root / sub)
        tensors, extra = split_extra(tensors)
        problem = state_dict_mismatch(reft_model.adapters[name].state_dict(), tensors)
        if problem:
            raise CheckpointError(
                f"{root / sub}: the saved tensors of adapter {name!r} do not match this model's interventions "
                f"({problem}); was it saved from another config?"
            )
        loaded.append((name, tensors, extra, config.get("extra") if isinstance(config, Mapping) else None))
    for name, tensors, extra, extra_config in loaded:
        set_adapter_state_dict(reft_model, name, tensors)
        _load_extra(reft_model, extra, extra_config)
