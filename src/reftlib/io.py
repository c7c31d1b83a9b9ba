"""Saving and loading interventions: safetensors + JSON, atomic, never pickle.

This module is the one owner of reftlib's on-disk format: the trainer's checkpoints, the
pyreft converter and the command line all read and write folders through it.

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
(``os.replace`` is atomic), so an interrupted save leaves the previous save intact. The
safetensors file is self-describing (its metadata holds the config), so a folder is always
loadable from that one file even if a crash separated it from its JSON copy. Every reader
checks the format version and refuses files written by a newer reftlib.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_dumps

from .checks import require_model, require_reft_model
from .config import FORMAT_NAME, FORMAT_VERSION, ReftConfig
from .errors import AdapterError, CheckpointError, ReftConfigError, ReftError
from .model import DEFAULT_ADAPTER

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
    "read_adapter",
    "read_adapter_config",
    "read_index",
    "resolve_folder",
    "save_reft_model",
    "saved_adapters",
    "set_adapter_state_dict",
    "split_extra",
    "state_dict_key",
    "write_adapter_files",
    "write_index",
]

CONFIG_NAME = "reft_config.json"
WEIGHTS_NAME = "reft_model.safetensors"
INDEX_NAME = "reft_adapters.json"
PYREFT_CONFIG_NAME = "config.json"  # a pyreft / pyvene save folder: config.json + intkey_<key>.bin files
EXTRA_PREFIX = "__extra__."
_PYREFT_WEIGHTS_GLOB = "intkey_*.bin"
_METADATA_KEY = "reftlib_config"

#: The keyword arguments ``ReftModel.save_pretrained`` accepts (anything else is refused).
SAVE_PRETRAINED_ARGUMENTS = ("selected_adapters", "adapter_names", "is_main_process", "state_dict",
                             "safe_serialization")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # mkstemp creates 0600 files; saved files follow the umask instead


# --------------------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise
    with _suppress():  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


# --------------------------------------------------------------------------- naming and detection
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


def is_pyreft_folder(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` looks like a pyreft/pyvene save (``config.json`` + ``intkey_*.bin``)."""
    directory = Path(directory)
    return (directory / PYREFT_CONFIG_NAME).is_file() and any(directory.glob(_PYREFT_WEIGHTS_GLOB))


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


# --------------------------------------------------------------------------- adapter index
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


def write_index(folder: str | os.PathLike, adapters: Mapping[str, str], active: Sequence[str]) -> None:
    """Write ``reft_adapters.json`` (atomically): ``{adapter name: subfolder}`` and the active adapters."""
    index = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "adapters": dict(adapters),
        "active": list(active),
    }
    atomic_write_bytes(Path(folder) / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())


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


# --------------------------------------------------------------------------- adapter state dicts
def _adapter_modules(reft_model: ReftModel, adapter_name: str) -> torch.nn.Module:
    if not isinstance(adapter_name, str) or adapter_name not in reft_model.adapters:
        raise AdapterError(f"unknown adapter {adapter_name!r}; this model has adapters {reft_model.adapter_names}")
    return reft_model.adapters[adapter_name]


def _mismatch(expected: Mapping[str, torch.Tensor], tensors: Mapping[str, Any]) -> str | None:
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
    live = _adapter_modules(reft_model, adapter_name).state_dict()
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
    problem = _mismatch(live, taken)
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
    modules = _adapter_modules(reft_model, adapter_name)
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    taken = _from_full_state_dict(state_dict, adapter_name)
    tensors = dict(state_dict) if taken is None else taken
    problem = _mismatch(modules.state_dict(), tensors)
    if problem:
        raise CheckpointError(f"adapter {adapter_name!r}: {problem}")
    modules.load_state_dict(tensors, strict=True)


# --------------------------------------------------------------------------- save
def write_adapter_files(directory: str | os.PathLike, config: Mapping[str, Any],
                        tensors: Mapping[str, torch.Tensor]) -> None:
    """Write one adapter folder: ``reft_model.safetensors`` (config embedded) then ``reft_config.json``.

    Each file is written atomically; the weights go first, so a crash in between leaves a
    self-describing new weights file next to the old JSON copy (readers prefer the embedded config).
    """
    directory = Path(directory)
    text = json.dumps(dict(config), indent=2)
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    blob = safetensors_dumps(data, metadata={"format": "pt", _METADATA_KEY: text})
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
        _adapter_modules(reft_model, name)
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
def resolve_folder(path_or_repo_id: str | os.PathLike, **hub_kwargs: Any) -> Path:
    """A local folder as is, otherwise a Hub snapshot (from the local cache when offline)."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        subfolder = hub_kwargs.get("subfolder")
        if subfolder:
            if not (path / subfolder).is_dir():
                raise CheckpointError(f"{path} has no subfolder {subfolder!r}")
            return path / subfolder
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the folder that contains {WEIGHTS_NAME}")
    repo_id = str(path_or_repo_id)
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".")):
        raise CheckpointError(f"{repo_id!r} is neither an existing folder nor a Hub repo id ('user/name')")
    from huggingface_hub import snapshot_download

    allowed = {"revision", "cache_dir", "token", "local_files_only", "subfolder"}
    unknown = set(hub_kwargs) - allowed
    if unknown:
        raise ReftConfigError(f"unknown argument(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    subfolder = hub_kwargs.pop("subfolder", None)
    try:
        folder = Path(snapshot_download(repo_id, **hub_kwargs))
    except Exception as exc:
        raise CheckpointError(
            f"{repo_id!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc}). Check the name, your network, or set HF_HUB_OFFLINE=1 to use the cache"
        ) from exc
    return folder / subfolder if subfolder else folder


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
    text = metadata.get(_METADATA_KEY)
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
            from .interop import read_pyreft_folder

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
    from .interventions.rotation import raw_from_columns

    return {key: (raw_from_columns(value).to(value.dtype) if key.endswith("rotate_layer.raw") and value.dim() == 2
                  else value) for key, value in tensors.items()}


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
    problem = _mismatch(reft_model.adapters[adapter_name].state_dict(), tensors)
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
    from .model import ReftModel

    require_model(model, "model", "load_reft_model")
    folder = resolve_folder(path_or_repo_id, **hub_kwargs)
    adapters, active = saved_adapters(folder, default_name=adapter_name)  # checks the index before any work
    if disable_model_grads:
        for param in model.parameters():
            param.requires_grad_(False)
    reft_model = (reft_model_class or ReftModel)(model)
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
        problem = _mismatch(reft_model.adapters[name].state_dict(), tensors)
        if problem:
            raise CheckpointError(
                f"{root / sub}: the saved tensors of adapter {name!r} do not match this model's interventions "
                f"({problem}); was it saved from another config?"
            )
        loaded.append((name, tensors, extra, config.get("extra") if isinstance(config, Mapping) else None))
    for name, tensors, extra, extra_config in loaded:
        set_adapter_state_dict(reft_model, name, tensors)
        _load_extra(reft_model, extra, extra_config)


# --------------------------------------------------------------------------- hub
def model_card(reft_model: ReftModel) -> str:
    base = reft_model.reft_config.base_model_name_or_path or "unknown"
    rows = []
    for name in reft_model.adapter_names:
        for rep in reft_model.reft_configs[name].representations:
            iv = rep.intervention.get_config()
            rows.append(
                f"| {name} | {rep.name} | {rep.layer} | {rep.component} | {iv['type']} | "
                f"{iv.get('low_rank_dimension', '')} | {rep.positions or 'all / per call'} |"
            )
    params = reft_model.count_parameters(trainable_only=False)
    return (
        "---\nlibrary_name: reftlib\n"
        + (f"base_model: {base}\n" if base != "unknown" else "")
        + "tags:\n- reftlib\n- reft\n- representation-fine-tuning\n---\n\n"
        + f"# Interventions for {base}\n\n"
        + f"Representation interventions trained with reftlib ({params:,d} parameters).\n\n"
        + "| adapter | key | layer | component | type | rank | positions |\n|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n\n## Usage\n\n```python\nfrom transformers import AutoModelForCausalLM\nfrom reftlib import ReftModel\n\n"
        + f'model = AutoModelForCausalLM.from_pretrained("{base}")\n'
        + 'reft_model = ReftModel.from_pretrained("<this repo>", model)\n```\n'
    )


def push_to_hub(reft_model: ReftModel, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload reftlib interventions", api=None, **kwargs: Any):
    """Save to a temporary folder with a model card and upload it with ``huggingface_hub``."""
    from huggingface_hub import HfApi

    api = api or HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        reft_model.save_pretrained(tmp)
        atomic_write_bytes(Path(tmp) / "README.md", model_card(reft_model).encode())
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(folder_path=tmp, repo_id=repo_id, commit_message=commit_message, **kwargs)
