"""Reading saved folders: file names, the adapter index, one adapter's config and tensors.

A saved folder holds ``reft_config.json`` and ``reft_model.safetensors`` (the config embedded in
its metadata, so the weights file alone is loadable), plus ``reft_adapters.json`` and one
subfolder per other adapter when it holds several; a pyreft / pyvene save folder is read too
(converted by :mod:`reftlib.pyreft_format`). Every reader checks the format version and refuses
files written by a newer reftlib; tensors of older versions are upgraded (:func:`upgrade_tensors`).
Writing lives in :mod:`reftlib.io`, which re-exports everything here.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .config import CONFIG_FILE_NAME, DEFAULT_ADAPTER, FORMAT_NAME, FORMAT_VERSION
from .errors import CheckpointError
from .interventions.rotation import raw_from_columns
from .pyreft_format import is_pyreft_folder, read_pyreft_folder

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_METADATA_KEY",
    "CONFIG_NAME",
    "INDEX_NAME",
    "WEIGHTS_NAME",
    "check_format_version",
    "holds_adapters",
    "read_adapter",
    "read_adapter_config",
    "read_index",
    "saved_adapters",
    "upgrade_tensors",
]

#: An adapter's config as JSON (a human-readable copy of the one embedded in the weights file).
CONFIG_NAME = CONFIG_FILE_NAME
#: An adapter's tensors, with its config embedded in the safetensors metadata.
WEIGHTS_NAME = "reft_model.safetensors"
#: The index of a folder holding several adapters (or one not named ``"default"``).
INDEX_NAME = "reft_adapters.json"
#: The safetensors metadata entry holding the adapter's config (JSON).
CONFIG_METADATA_KEY = "reftlib_config"


def holds_adapters(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds saved interventions: reftlib's weights or index, or a pyreft save."""
    directory = Path(directory)
    return (directory / WEIGHTS_NAME).is_file() or (directory / INDEX_NAME).is_file() or is_pyreft_folder(directory)


def check_format_version(data: Any, where: str | os.PathLike) -> None:
    """Refuse a config or index (``data``) that a newer reftlib wrote, or that is not reftlib's.

    Raises:
        CheckpointError: ``format`` is not ``"reftlib"``, or ``format_version`` is not an integer
            or is newer than :data:`reftlib.config.FORMAT_VERSION`.
    """
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(data).__name__}; the file is corrupted")
    if data.get("format", FORMAT_NAME) != FORMAT_NAME:
        raise CheckpointError(f"{where}: format {data.get('format')!r} is not a reftlib file")
    version = data.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{where}: format_version {version!r} is not a positive integer; the file is corrupted")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where} was written by a newer reftlib (format version {version}; this reftlib reads up to "
            f"{FORMAT_VERSION}); upgrade with `pip install -U reftlib`"
        )


def read_index(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``reft_adapters.json`` of a multi-adapter folder (validated, version-checked), or ``None``.

    Raises:
        CheckpointError: the index is not valid JSON, lacks its ``adapters`` map, names a subfolder
            outside ``folder``, or was written by a newer reftlib.
    """
    folder = Path(folder)
    index_path = folder / INDEX_NAME
    if not index_path.exists():
        return None
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        adapters = index["adapters"]
        if not isinstance(adapters, dict) or not adapters or not all(isinstance(v, str) for v in adapters.values()):
            raise TypeError("'adapters' must map adapter names to subfolders")
        active = index.get("active") or []
        if not isinstance(active, list) or not all(name in adapters for name in active):
            raise TypeError("'active' must list saved adapters")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path} is corrupted ({exc}); re-save the folder") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {index_path} ({exc})") from exc
    check_format_version(index, index_path)
    for name, sub in adapters.items():
        parts = PurePosixPath(sub).parts
        if PurePosixPath(sub).is_absolute() or ".." in parts or "\\" in sub:
            raise CheckpointError(f"{index_path}: adapter {name!r} points outside the folder ({sub!r}); refusing it")
    return index


def saved_adapters(folder: str | os.PathLike, default_name: str = DEFAULT_ADAPTER) -> tuple[dict[str, str], list[str]]:
    """``({adapter name: subfolder}, active adapter names)`` of a saved folder.

    A folder with an index lists its adapters; a single-adapter folder (reftlib's or pyreft's)
    holds one adapter at ``"."``, named ``default_name``.

    Raises:
        CheckpointError: the folder holds no saved interventions, or its index is corrupted or newer.
    """
    folder = Path(folder)
    index = read_index(folder)
    if index is not None:
        adapters = dict(index["adapters"])
        return adapters, list(index.get("active") or list(adapters)[:1])
    if not holds_adapters(folder):
        raise CheckpointError(f"{folder} has no {WEIGHTS_NAME}; is this a folder saved by reftlib's save_pretrained?")
    return {default_name: "."}, [default_name]


def _read_weights(directory: Path, with_tensors: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config, tensors)`` of a reftlib adapter folder; ``tensors`` is empty without ``with_tensors``."""
    weights = directory / WEIGHTS_NAME
    try:
        with safe_open(str(weights), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()} if with_tensors else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{weights} is truncated or corrupted ({exc}); re-save it or restore it from a copy"
        ) from exc
    text = metadata.get(CONFIG_METADATA_KEY)
    json_path = directory / CONFIG_NAME
    if text is None:
        if not json_path.exists():
            raise CheckpointError(f"{weights} carries no reftlib config and {CONFIG_NAME} is missing")
        text = json_path.read_text()
    elif json_path.exists():
        try:
            if json.loads(json_path.read_text()) != json.loads(text):
                logger.warning("%s differs from the config embedded in %s; using the embedded one", json_path, weights)
        except json.JSONDecodeError:
            logger.warning("%s is not valid JSON; using the config embedded in %s", json_path, weights)
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"the config of {directory} is not valid JSON ({exc})") from exc
    check_format_version(config, directory)
    return config, tensors


def read_adapter(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read ``(config dict, tensors)`` from one adapter folder (reftlib's, or a pyreft save), with clear errors.

    The format version is checked (a newer one is refused) and older tensors are upgraded.
    """
    directory = Path(directory)
    if not (directory / WEIGHTS_NAME).exists():
        if is_pyreft_folder(directory):
            return read_pyreft_folder(directory)
        raise CheckpointError(f"{directory} has no {WEIGHTS_NAME}; is this a folder saved by reftlib's save_pretrained?")
    config, tensors = _read_weights(directory, with_tensors=True)
    return config, upgrade_tensors(config, tensors)


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The config dict of one adapter folder, without reading its tensors (version-checked)."""
    directory = Path(directory)
    if not (directory / WEIGHTS_NAME).exists():
        return read_adapter(directory)[0]  # pyreft folders, or the "not a checkpoint" error
    return _read_weights(directory, with_tensors=False)[0]


def upgrade_tensors(config: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors of an older format version, rewritten as the current version stores them.

    Version 1 kept LoReFT-style rotations (``*.rotate_layer.raw``) in the hidden state's own basis;
    version 2 keeps them in the mixed basis the optimizer works in (see
    :mod:`reftlib.interventions.rotation`). R itself is unchanged (up to fp32 rounding).
    """
    version = config.get("format_version", 1) if isinstance(config, Mapping) else 1
    if not isinstance(version, int) or version >= 2:
        return tensors
    return {key: (raw_from_columns(value).to(value.dtype) if key.endswith("rotate_layer.raw") and value.dim() == 2
                  else value) for key, value in tensors.items()}
