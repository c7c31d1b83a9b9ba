"""The pyreft / pyvene checkpoint format (``config.json`` + ``intkey_*.bin``): detection and conversion.

:func:`read_pyreft_folder` turns a pyreft save folder into reftlib's ``(config dict, tensors)``
in memory; :mod:`reftlib.io` uses it (``ReftModel.from_pretrained(folder, model)`` recognizes a
pyreft folder by itself and converts it on the fly) and :func:`reftlib.interop.convert_pyreft_checkpoint`
writes the result as a reftlib folder once, so that later loads read safetensors only. This module
writes nothing and imports neither :mod:`reftlib.io` nor :mod:`reftlib.model`.

What a pyreft (0.0.5 to 0.1.x, pyvene 0.1.1 to 0.1.8) save folder holds:

* ``config.json``: a pyvene ``IntervenableConfig``. ``representations`` is a list of positional
  lists in the order of pyvene's ``RepresentationConfig`` fields (``layer, component, unit,
  max_number_of_units, low_rank_dimension, intervention_type, intervention, subspace_partition,
  group_key, intervention_link_key, moe_key, source_representation,
  hidden_source_representation[, latent_dim]``); ``intervention_types`` holds class names as
  ``"<class 'pyreft.interventions.LoreftIntervention'>"``; ``sorted_keys`` the intervention keys
  in the same order.
* ``intkey_{key}.bin`` per intervention: ``torch.save`` of a plain dict of tensors. LoReFT
  stores ``{"weight", "bias", "rotate_layer"}`` (``rotate_layer`` = R as a ``[d, r]`` matrix with
  orthonormal columns); the other classes store their default ``state_dict``, where an
  orthogonal R is a torch parametrization (``rotate_layer.parametrizations.weight.original``
  and ``...weight.0.base``) that is evaluated here to recover R.

Only tensors are ever read (``torch.load(..., weights_only=True)``); class names are mapped
to reftlib types through the explicit table :data:`PYREFT_INTERVENTION_TYPES`, never imported.

pyreft does not save ``act_fn``, ``dropout`` or the dtype of its interventions: they are read
as pyreft's defaults (linear activation, no dropout) and float32 (lossless for any saved dtype). Pass
``act_fn=`` to :func:`read_pyreft_folder` / :func:`~reftlib.interop.convert_pyreft_checkpoint` for checkpoints
trained with another activation.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import COMPONENTS, FORMAT_NAME, FORMAT_VERSION
from .errors import CheckpointError, ReftConfigError
from .interventions.base import dtype_from_name, dtype_name, intervention_class
from .interventions.loreft import activation
from .interventions.pyreft_state import BOOKKEEPING_KEYS
from .positions import parse_position_spec

logger = logging.getLogger(__name__)

__all__ = [
    "PYREFT_COMPONENTS",
    "PYREFT_CONFIG_NAME",
    "PYREFT_INTERVENTION_TYPES",
    "PYREFT_WEIGHTS_GLOB",
    "is_pyreft_folder",
    "read_pyreft_folder",
]

#: The config file of a pyreft / pyvene save folder (next to one ``intkey_<key>.bin`` per intervention).
PYREFT_CONFIG_NAME = "config.json"
#: The intervention weight files of a pyreft / pyvene save folder.
PYREFT_WEIGHTS_GLOB = "intkey_*.bin"

#: pyreft intervention class (full dotted name) -> reftlib intervention type.
PYREFT_INTERVENTION_TYPES: dict[str, str] = {
    "pyreft.interventions.LoreftIntervention": "loreft",
    "pyreft.interventions.NoreftIntervention": "noreft",
    "pyreft.interventions.DireftIntervention": "direft",
    "pyreft.interventions.NodireftIntervention": "nodireft",
    "pyreft.interventions.ConsreftIntervention": "consreft",
    "pyreft.interventions.LobireftIntervention": "lobireft",
}

#: pyvene components with the same meaning in reftlib (names map 1:1).
PYREFT_COMPONENTS: tuple[str, ...] = (
    "block_input",
    "block_output",
    "attention_input",
    "attention_output",
    "mlp_input",
    "mlp_output",
    "query_output",
    "key_output",
    "value_output",
)
assert set(PYREFT_COMPONENTS) <= set(COMPONENTS)

# pyvene's RepresentationConfig namedtuple fields, in order (``latent_dim`` was added in 0.1.5).
_REPRESENTATION_FIELDS = (
    "layer", "component", "unit", "max_number_of_units", "low_rank_dimension", "intervention_type",
    "intervention", "subspace_partition", "group_key", "intervention_link_key", "moe_key",
    "source_representation", "hidden_source_representation", "latent_dim",
)


# --------------------------------------------------------------------------- detection
def with_positions(config: Mapping[str, Any], positions: str) -> dict[str, Any]:
    """``config`` (a pyreft folder's, from :func:`read_pyreft_folder`) with ``positions`` recorded for every
    intervention: pyreft does not save the token positions an intervention was trained at.

    Raises:
        PositionError: ``positions`` is not a position spec (e.g. ``"f1+l1"``).
    """
    parse_position_spec(positions)
    return {**config, "representations": [{**rep, "positions": positions} for rep in config["representations"]]}


def is_pyreft_folder(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` looks like a pyreft/pyvene save (``config.json`` + ``intkey_*.bin``)."""
    directory = Path(directory)
    return (directory / PYREFT_CONFIG_NAME).is_file() and any(directory.glob(PYREFT_WEIGHTS_GLOB))


# --------------------------------------------------------------------------- reading
def read_pyreft_folder(
    directory: str | os.PathLike,
    *,
    dtype: str | torch.dtype | None = None,
    act_fn: str | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Convert a pyreft save folder to reftlib's ``(config dict, tensors)``.

    Args:
        directory: folder written by ``pyreft.ReftModel.save`` (or pyvene's ``IntervenableModel.save``).
        dtype: dtype of the reftlib interventions; default ``float32``, which holds pyreft's
            ``float32`` and ``bfloat16`` weights exactly (a float32 intervention works on a bf16
            model: reftlib casts the hidden states). Pass ``"bfloat16"`` to halve their memory.
        act_fn: activation of LoReFT/NoReFT/DiReFT/NodiReFT (pyreft does not save it);
            default ``"linear"``, pyreft's default.

    Returns:
        ``(config, tensors)``: a :meth:`ReftConfig.to_dict`-style dict and the tensors keyed
        ``<intervention name>.<parameter name>`` as in ``reft_model.adapters[name].state_dict()``.

    Raises:
        CheckpointError: a file is missing, unreadable or corrupted, holds something other
            than tensors, or uses an intervention class / component reftlib cannot represent.
    """
    directory = Path(directory)
    config_path = directory / PYREFT_CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no {PYREFT_CONFIG_NAME}; is this a folder saved by pyreft's reft_model.save()?")
    try:
        raw_config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON ({exc}); the file may be truncated") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read {config_path} ({exc})") from exc
    if not isinstance(raw_config, Mapping) or not isinstance(raw_config.get("representations"), list):
        raise CheckpointError(f"{config_path} has no 'representations' list; it is not a pyreft/pyvene config")
    representations = [_representation(r, config_path, i) for i, r in enumerate(raw_config["representations"])]
    if not representations:
        raise CheckpointError(f"{config_path} lists no representations (no interventions to load)")
    count = len(representations)
    types = _per_intervention(raw_config.get("intervention_types"), count, "intervention_types", config_path)
    keys = _per_intervention(raw_config.get("sorted_keys"), count, "sorted_keys", config_path, optional=True)
    if keys is None:
        keys = _pyvene_keys(representations)
    dims = _per_intervention(raw_config.get("intervention_dimensions"), count, "intervention_dimensions",
                             config_path, optional=True) or [None] * count
    if act_fn is not None:
        try:
            activation(act_fn)
        except ReftConfigError as exc:
            raise CheckpointError(str(exc)) from exc
    target_dtype = None if dtype is None else _check_dtype(dtype)
    if (directory / "pytorch_model.bin").exists():
        logger.warning(
            "%s also holds base-model weights (pyvene include_model=True); reftlib loads only the interventions",
            directory,
        )

    config_reps: list[dict[str, Any]] = []
    tensors: dict[str, torch.Tensor] = {}
    names: set[str] = set()
    for index, (rep, type_string, key, dim) in enumerate(zip(representations, types, keys, dims)):
        type_name = _reftlib_type(type_string, config_path)
        component, layer = _component(rep, config_path, index)
        unit = rep.get("unit") or "pos"
        if unit != "pos":
            raise CheckpointError(
                f"{config_path}: intervention {key!r} uses unit {unit!r}; reftlib converts pyreft interventions on "
                "whole vectors (unit 'pos') only"
            )
        if rep.get("intervention_link_key") is not None:
            logger.warning(
                "%s: intervention %r shares its weights with others (intervention_link_key=%r); reftlib loads an "
                "independent copy per site (same outputs, but further training will not keep them tied)",
                directory, key, rep["intervention_link_key"],
            )
        state = _load_state(directory, key)
        params, iv_config = _convert(type_name, state, directory / f"intkey_{key}.bin")
        embed_dim = iv_config["embed_dim"]
        _check_dims(state, dim, embed_dim, key, directory)
        iv_dtype = target_dtype or torch.float32
        iv_config["dtype"] = dtype_name(iv_dtype)
        if "act_fn" in iv_config:
            iv_config["act_fn"] = act_fn or "linear"
        name = _unique(re.sub(r"[^A-Za-z0-9_\-#]", "_", str(key)), names)
        config_reps.append({
            "layer": layer,
            "component": component,
            "unit": "pos",
            "max_number_of_units": int(rep.get("max_number_of_units") or 1),
            "positions": None,
            "name": name,
            "intervention": iv_config,
        })
        for param, value in params.items():
            tensors[f"{name}.{param}"] = value.detach().to(dtype=iv_dtype).contiguous()
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "base_model_name_or_path": None,
        "base_model_type": None,
        "representations": config_reps,
    }
    return config, tensors


def _check_dtype(dtype: str | torch.dtype) -> torch.dtype:
    try:
        return dtype_from_name(dtype)
    except ReftConfigError as exc:
        raise CheckpointError(str(exc)) from exc


def _representation(entry: Any, where: Path, index: int) -> dict[str, Any]:
    """One pyvene representation (a positional list, or a dict) as a dict of named fields."""
    if isinstance(entry, Mapping):
        return dict(entry)
    if isinstance(entry, list) and 2 <= len(entry) <= len(_REPRESENTATION_FIELDS):
        return dict(zip(_REPRESENTATION_FIELDS, entry))
    raise CheckpointError(
        f"{where}: representation {index} is {entry!r}; expected pyvene's list of "
        f"{len(_REPRESENTATION_FIELDS) - 1} or {len(_REPRESENTATION_FIELDS)} fields ({', '.join(_REPRESENTATION_FIELDS)})"
    )


def _per_intervention(value: Any, count: int, field: str, where: Path, optional: bool = False) -> list | None:
    if value is None:
        if optional:
            return None
        raise CheckpointError(f"{where} has no {field!r}; it is not a pyreft/pyvene config")
    if isinstance(value, str) and field == "intervention_types":
        value = [value] * count  # one type for every representation
    if not isinstance(value, list) or len(value) != count:
        raise CheckpointError(
            f"{where}: {field!r} has {len(value) if isinstance(value, list) else 'no list of'} entries but there are "
            f"{count} representations; the config is inconsistent"
        )
    return value


def _pyvene_keys(representations: list[dict[str, Any]]) -> list[str]:
    """Recompute pyvene's intervention keys (for configs without ``sorted_keys``), pyvene ≥ 0.1.7 style."""
    counter: dict[str, int] = {}
    keys = []
    for rep in representations:
        component, unit = str(rep.get("component")), str(rep.get("unit") or "pos").replace(".", "_")
        nunit = rep.get("max_number_of_units") or 1
        if "." in component:
            proposal = f"comp_{component.replace('.', '_')}_unit_{unit}_nunit_{nunit}"
        else:
            proposal = f"layer_{rep.get('layer')}_comp_{component}_unit_{unit}_nunit_{nunit}"
        counter[proposal] = counter.get(proposal, -1) + 1
        keys.append(f"{proposal}#{counter[proposal]}")
    return keys


def _reftlib_type(type_string: Any, where: Path) -> str:
    text = str(type_string)
    match = re.fullmatch(r"\s*<class '([\w.]+)'>\s*", text)
    dotted = match.group(1) if match else text.strip()
    if dotted in PYREFT_INTERVENTION_TYPES:
        return PYREFT_INTERVENTION_TYPES[dotted]
    supported = ", ".join(name.rsplit(".", 1)[1] for name in PYREFT_INTERVENTION_TYPES)
    raise CheckpointError(
        f"{where}: intervention class {dotted!r} cannot be converted; reftlib reads the pyreft classes {supported} "
        "(custom or pyvene intervention classes are not supported)"
    )


def _component(rep: Mapping[str, Any], where: Path, index: int) -> tuple[str, int | None]:
    """``(reftlib component, layer)`` for a pyvene component name or module path."""
    component = rep.get("component")
    if not isinstance(component, str) or not component:
        raise CheckpointError(f"{where}: representation {index} has no component")
    if "." in component:  # pyvene module path: "<module path>.input" / "<module path>.output"
        path, _, kind = component.rpartition(".")
        if kind not in ("input", "output") or not path:
            raise CheckpointError(
                f"{where}: component {component!r} is a module path but does not end in '.input' or '.output'"
            )
        path = re.sub(r"\[(-?\d+)\]", r".\1", path)  # pyvene also accepts "layers[3]"
        return f"{path}:{kind}", None
    if component not in PYREFT_COMPONENTS:
        raise CheckpointError(
            f"{where}: component {component!r} has no reftlib equivalent; convertible components are "
            f"{list(PYREFT_COMPONENTS)} and module paths (e.g. 'model.layers.3.mlp.output')"
        )
    layer = rep.get("layer")
    try:
        layer = int(layer)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: representation {index} has layer {layer!r}; expected an integer") from exc
    return component, layer


def _load_state(directory: Path, key: str) -> dict[str, torch.Tensor]:
    if not isinstance(key, str) or not key or any(c in key for c in "/\\\0"):
        raise CheckpointError(f"{directory}: intervention key {key!r} is not a valid file-name part")
    path = directory / f"intkey_{key}.bin"
    if not path.is_file():
        present = sorted(p.name for p in directory.glob(PYREFT_WEIGHTS_GLOB))
        raise CheckpointError(f"{path} is missing (the config lists intervention {key!r}); present: {present}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CheckpointError(
                f"{path} holds objects other than tensors; reftlib reads only tensors and will not unpickle it ({exc})"
            ) from exc
        raise CheckpointError(f"{path} is truncated or corrupted ({exc}); re-save it with pyreft") from exc
    except Exception as exc:  # torch.load raises many types for damaged files
        raise CheckpointError(
            f"{path} is truncated or corrupted ({type(exc).__name__}: {exc}); re-save it with pyreft"
        ) from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a dict of tensors (got {type(state).__name__})")
    return {str(k): v for k, v in state.items()}


def _convert(type_name: str, state: dict[str, torch.Tensor], where: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Map one pyreft state dict to reftlib parameter names and an intervention config.

    The mapping itself is the intervention class's ``from_pyreft_state``; here the result is checked:
    no tensor left unread, every tensor of the shape the dimensions imply, floating point.
    """
    params, arguments, used = intervention_class(type_name).from_pyreft_state(state, where)
    unexpected = sorted(set(state) - set(used) - BOOKKEEPING_KEYS)
    if unexpected:
        raise CheckpointError(
            f"{where}: unexpected tensors {unexpected} for a pyreft {type_name} intervention; "
            "the file was written by an unsupported pyreft version or a custom class"
        )
    embed_dim, rank = arguments["embed_dim"], arguments["low_rank_dimension"]
    expected_shapes = {
        "rotate_layer.raw": (embed_dim, rank),
        "learned_source.weight": (rank, embed_dim),
        "learned_source.bias": (rank,),
        "learned_source": (rank,),
        "proj_layer.weight": (rank, embed_dim),
        "proj_layer.bias": (rank,),
    }
    for name, value in params.items():
        if tuple(value.shape) != expected_shapes[name]:
            raise CheckpointError(
                f"{where}: tensor for {name} has shape {tuple(value.shape)}, expected {expected_shapes[name]} "
                f"(embed_dim={embed_dim}, rank={rank}); the file is inconsistent"
            )
        if not value.is_floating_point():
            raise CheckpointError(f"{where}: tensor for {name} has dtype {value.dtype}; expected floating point")
    return params, {"type": type_name, "dtype": "float32", "dropout": 0.0, **arguments}


def _check_dims(state: Mapping[str, torch.Tensor], saved_dim: Any, embed_dim: int, key: str, directory: Path) -> None:
    for label, value in (("embed_dim", state.get("embed_dim")), ("intervention_dimensions", saved_dim)):
        if isinstance(value, torch.Tensor):
            value = value.item() if value.numel() == 1 else None
        if isinstance(value, list):
            value = value[0] if len(value) == 1 else None
        if isinstance(value, (int, float)) and int(value) != embed_dim:
            raise CheckpointError(
                f"{directory}: intervention {key!r} records {label}={int(value)} but its weights have width "
                f"{embed_dim}; the checkpoint is inconsistent"
            )


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        candidate = f"{name}_{n}"
        n += 1
    taken.add(candidate)
    return candidate
