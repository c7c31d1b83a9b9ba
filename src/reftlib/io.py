"""Saving and loading interventions: safetensors + JSON, atomic, never pickle.

Layout of a saved folder (PEFT-style)::

    reft_config.json          # the default adapter's ReftConfig (human readable copy)
    reft_model.safetensors    # its tensors; the config is also embedded in the metadata
    reft_adapters.json        # index of adapters when more than one is saved
    <adapter_name>/...        # the same two files for each non-default adapter

Every file is written to a temporary name, flushed to disk and renamed over the old one
(``os.replace`` is atomic), so an interrupted save leaves the previous save intact. The
safetensors file is self-describing (its metadata holds the config), so a folder is always
loadable from that one file even if a crash separated it from its JSON copy.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_dumps

from .config import FORMAT_NAME, FORMAT_VERSION, ReftConfig
from .errors import CheckpointError, ReftConfigError, ReftError

if TYPE_CHECKING:
    from .model import ReftModel

logger = logging.getLogger(__name__)

CONFIG_NAME = "reft_config.json"
WEIGHTS_NAME = "reft_model.safetensors"
INDEX_NAME = "reft_adapters.json"
_METADATA_KEY = "reftlib_config"


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


# --------------------------------------------------------------------------- save
def adapter_state_dict(reft_model: ReftModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """The persistent tensors of one adapter, keyed ``<intervention key>.<param name>``."""
    modules = reft_model.adapters[adapter_name]
    return {name: tensor.detach().contiguous().cpu() for name, tensor in modules.state_dict().items()}


def save_adapter(reft_model: ReftModel, adapter_name: str, directory: str | os.PathLike, extra: Mapping | None = None) -> None:
    """Save one adapter's config and tensors into ``directory`` (atomically, file by file)."""
    directory = Path(directory)
    config = reft_model.reft_configs[adapter_name].to_dict()
    if extra:
        config["extra"] = dict(extra)
    tensors = adapter_state_dict(reft_model, adapter_name)
    extra_tensors = getattr(reft_model, "extra_state_dict", None)
    if callable(extra_tensors) and adapter_name == reft_model.adapter_names[0]:
        tensors.update({f"__extra__.{k}": v for k, v in extra_tensors().items()})
    text = json.dumps(config, indent=2)
    blob = safetensors_dumps(tensors, metadata={"format": "pt", _METADATA_KEY: text})
    atomic_write_bytes(directory / WEIGHTS_NAME, blob)
    atomic_write_bytes(directory / CONFIG_NAME, (text + "\n").encode())


def save_reft_model(reft_model: ReftModel, save_directory: str | os.PathLike, *,
                    adapter_names: Sequence[str] | None = None, **_ignored: Any) -> None:
    """Save adapters: the default (or only/first) one at the root, the others in subfolders."""
    names = list(adapter_names) if adapter_names is not None else reft_model.adapter_names
    if not names:
        raise ReftError("this ReftModel has no adapters to save")
    for name in names:
        reft_model._check_adapter(name)
    root = Path(save_directory)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{root} exists and is not a folder; choose another save path")
    root_name = "default" if "default" in names else names[0]
    for name in names:
        save_adapter(reft_model, name, root if name == root_name else root / name)
    if len(names) > 1 or root_name != "default":
        index = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "adapters": {name: "." if name == root_name else name for name in names},
            "active": [n for n in reft_model.active_adapters if n in names],
        }
        atomic_write_bytes(root / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
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


def read_adapter(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read ``(config dict, tensors)`` from one adapter folder, with clear errors."""
    weights = directory / WEIGHTS_NAME
    if not weights.exists():
        if (directory / "config.json").exists() and any(directory.glob("intkey_*.bin")):
            from .interop import read_pyreft_folder

            return read_pyreft_folder(directory)
        raise CheckpointError(f"{directory} has no {WEIGHTS_NAME}; is this a folder saved by reftlib's save_pretrained?")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
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
    return config, upgrade_tensors(config, tensors)


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


def _attach(reft_model: ReftModel, adapter_name: str, config_dict: dict[str, Any],
            tensors: dict[str, torch.Tensor], is_trainable: bool, where: Path, activate: bool = True) -> None:
    config_dict = dict(config_dict)
    config_dict.pop("extra", None)
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
    extra = {k.removeprefix("__extra__."): v for k, v in tensors.items() if k.startswith("__extra__.")}
    tensors = {k: v for k, v in tensors.items() if not k.startswith("__extra__.")}
    modules = reft_model.adapters[adapter_name]
    expected = modules.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        reft_model.delete_adapter(adapter_name)
        raise CheckpointError(f"{where}: tensors do not match the config (missing {missing}, unexpected {unexpected})")
    for key, value in tensors.items():
        if tuple(expected[key].shape) != tuple(value.shape):
            reft_model.delete_adapter(adapter_name)
            raise CheckpointError(
                f"{where}: tensor {key} has shape {tuple(value.shape)} but this model needs {tuple(expected[key].shape)}"
            )
    modules.load_state_dict(tensors, strict=True)
    if extra and hasattr(reft_model, "load_extra_state_dict"):
        reft_model.load_extra_state_dict(extra)
    for param in modules.parameters():
        param.requires_grad_(is_trainable)


def _read_index(folder: Path) -> dict[str, Any] | None:
    """The ``reft_adapters.json`` of a multi-adapter folder (validated), or ``None``."""
    index_path = folder / INDEX_NAME
    if not index_path.exists():
        return None
    try:
        index = json.loads(index_path.read_text())
        adapters = index["adapters"]
        if not isinstance(adapters, dict) or not all(isinstance(v, str) for v in adapters.values()):
            raise TypeError("'adapters' must map names to subfolders")
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index_path} is corrupted ({exc})") from exc
    if index.get("format_version", 1) > FORMAT_VERSION:
        raise CheckpointError(f"{folder} was written by a newer reftlib; upgrade with `pip install -U reftlib`")
    return index


def load_reft_model(path_or_repo_id, model, *, adapter_name: str = "default", is_trainable: bool = False,
                    reft_model_class=None, disable_model_grads: bool = True, **hub_kwargs: Any) -> ReftModel:
    """Build a :class:`ReftModel` on ``model`` from a saved folder or Hub repo.

    ``disable_model_grads=False`` keeps the base model's trainable parameters (e.g. LoRA) as they are.
    """
    from .model import ReftModel

    folder = resolve_folder(path_or_repo_id, **hub_kwargs)
    if disable_model_grads:
        for param in model.parameters():
            param.requires_grad_(False)
    reft_model = (reft_model_class or ReftModel)(model)
    index = _read_index(folder)
    if index is not None:
        adapters: dict[str, str] = index["adapters"]
        for name, sub in adapters.items():
            config, tensors = read_adapter(folder / sub)
            _attach(reft_model, name, config, tensors, is_trainable, folder / sub)
        reft_model.set_adapter(index.get("active") or list(adapters)[:1])
    else:
        config, tensors = read_adapter(folder)
        _attach(reft_model, adapter_name, config, tensors, is_trainable, folder)
        reft_model.set_adapter(adapter_name)
    if not is_trainable:
        for param in reft_model.adapters.parameters():
            param.requires_grad_(False)
        reft_model.eval()
    return reft_model


def load_adapter_into(reft_model: ReftModel, path_or_repo_id, adapter_name: str, *, is_trainable: bool = False,
                      **hub_kwargs: Any) -> None:
    """Add the adapter saved at ``path_or_repo_id`` to an existing model as ``adapter_name``."""
    from .errors import AdapterError

    if adapter_name in reft_model.adapters:
        raise AdapterError(
            f"an adapter named {adapter_name!r} is already loaded; choose another adapter_name or delete_adapter() it"
        )
    folder = resolve_folder(path_or_repo_id, **hub_kwargs)
    index = _read_index(folder)
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
    _attach(reft_model, adapter_name, config, tensors, is_trainable, folder, activate=not reft_model.active_adapters)


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
