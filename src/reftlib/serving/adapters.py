"""Saved adapters as a serving engine runs them: built from a folder and a model config, no model needed.

An engine such as vLLM does not run the Hugging Face model that :class:`~reftlib.ReftModel`
hooks, so it cannot attach adapters with ``ReftModel.add_adapter`` (which probes the model's
sites with a forward pass). :func:`load_served_adapter` instead builds each intervention of a
folder written by ``ReftModel.save_pretrained`` from its saved config, sizes it from the model's
``config.json`` (hidden size, heads, head size) and loads the saved tensors, checking every shape.
The same function runs in the user's process (so an adapter that cannot be served is refused
before the engine starts) and in the engine's worker processes.

This module does not import vLLM; :mod:`reftlib.serving.vllm_backend` does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ReftConfig
from ..errors import AdapterError, CheckpointError, PositionError, ReftConfigError
from ..folders import read_adapter, saved_adapters
from ..hub import resolve_folder
from ..interventions import Intervention
from ..io import split_extra, state_dict_mismatch
from ..plan import AdapterSpecs, CallPlan, build_plan, mask_from_lengths
from ..pyreft_format import is_pyreft_folder, with_positions

#: Components a served adapter may use, and what each means inside the engine's model.
SERVED_COMPONENTS = ("block_output", "head_output")

#: ``model_type`` values (from the model's ``config.json``) whose engine model reftlib can hook: vLLM
#: builds their decoder layers alike (they return ``(hidden, residual)``; attention output through
#: ``self_attn.o_proj``). Each is tested against the Hugging Face model (tests/test_vllm_architectures.py).
SERVED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma")


@dataclass(frozen=True)
class ServedIntervention:
    """One intervention of a served adapter: its key, site and module."""

    key: str
    layer: int
    component: str
    intervention: Intervention
    num_heads: int | None  # set for head_output: the site is viewed as [tokens, heads, head_dim]


@dataclass(frozen=True)
class ServedAdapter:
    """An adapter ready to serve: its interventions and configured positions."""

    name: str
    folder: str
    interventions: tuple[ServedIntervention, ...]
    positions: tuple[tuple[str, str | None], ...]  # (key, configured position spec or None), config order
    pyreft_positions: str | None = None  # the positions given for a pyreft folder (it records none)

    @property
    def source(self) -> tuple[str, str | None]:
        """``(folder, pyreft_positions)``: what rebuilds this adapter elsewhere (the engine's workers)."""
        return self.folder, self.pyreft_positions

    @property
    def specs(self) -> AdapterSpecs:
        """``{name: [(key, positions), ...]}``: what :func:`reftlib.plan.build_plan` needs."""
        return {self.name: list(self.positions)}

    @property
    def prompt_length_matters(self) -> bool:
        """Whether some intervention acts at positions counted from the prompt's end (e.g. ``"l1"``)."""
        return any(spec is not None for _key, spec in self.positions)

    def plan(self, prompt_length: int) -> CallPlan:
        """The plan of one request with a prompt of ``prompt_length`` tokens (``generate``'s ``"auto"`` mode).

        Position-restricted interventions act at their prompt positions; interventions on every
        position act on the prompt and on every generated token, exactly as ``ReftModel.generate``.
        """
        return build_plan(self.specs, [self.name], mask_from_lengths([prompt_length]), mode="auto")


def model_dimensions(model_config: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """``(num_hidden_layers, hidden_size, num_attention_heads, head_dim)`` of a ``config.json`` dict."""
    try:
        layers = int(model_config["num_hidden_layers"])
        hidden = int(model_config["hidden_size"])
        heads = int(model_config["num_attention_heads"])
    except (KeyError, TypeError, ValueError) as exc:
        raise AdapterError(f"the model's config.json lacks {exc}; cannot size the interventions") from exc
    head_dim = model_config.get("head_dim") or hidden // heads
    return layers, hidden, heads, int(head_dim)


def check_served_model(model_config: Mapping[str, Any]) -> None:
    """Refuse a model whose architecture the serving hooks do not know."""
    model_type = model_config.get("model_type")
    if model_type not in SERVED_MODEL_TYPES:
        raise AdapterError(
            f"serving reftlib adapters supports model types {list(SERVED_MODEL_TYPES)} (vLLM decoder layers built like Llama's); "
            f"this model is {model_type!r}. Use ReftModel.generate on the Hugging Face model instead"
        )


def resolve_adapter_folder(name: str, folder: str | os.PathLike) -> Path:
    """The one adapter folder ``folder`` names: itself, or its only subfolder listed in an index."""
    root = Path(folder)
    adapters, _active = saved_adapters(root, default_name=name)
    if name in adapters:
        return root / adapters[name]
    if len(adapters) == 1:
        return root / next(iter(adapters.values()))
    raise AdapterError(
        f"{root} holds several adapters {sorted(adapters)} and none is named {name!r}; name the adapter like one "
        f"of them, or pass its subfolder (e.g. {str(root / next(iter(adapters.values())))!r})"
    )


def load_served_adapter(name: str, folder: str | os.PathLike, model_config: Mapping[str, Any], *,
                        pyreft_positions: str | None = None) -> ServedAdapter:
    """Build adapter ``name`` saved in ``folder`` (a local folder or a Hub repo id) for a model with this ``config.json``.

    ``folder`` is a folder written by ``ReftModel.save_pretrained`` or by pyreft's ``ReftModel.save``.
    pyreft does not save the token positions its interventions were trained at, so a pyreft folder
    needs ``pyreft_positions`` (e.g. ``"f1+l1"``, recorded for every intervention, as
    :func:`reftlib.interop.convert_pyreft_checkpoint` does); a reftlib folder records its own.

    Raises:
        AdapterError: the adapter cannot be served (a component other than :data:`SERVED_COMPONENTS`,
            a module path, a stacked classification head, a layer the model lacks, another model type),
            or a pyreft folder comes without positions (or a reftlib folder with them).
        CheckpointError: the folder is not a saved adapter, or its tensors do not fit the config.
    """
    check_served_model(model_config)
    root = resolve_folder(folder)  # a local folder, or a Hub repo id (snapshot, from the cache when offline)
    if is_pyreft_folder(root):
        if pyreft_positions is None:
            raise AdapterError(
                f"adapter {name!r}: {root} is a pyreft checkpoint, which does not record the token positions its "
                "interventions were trained at; give the positions used in training, e.g. "
                f"ReftLLM(..., pyreft_positions={{{name!r}: 'f1+l1'}}) or `reftlib serve ... --pyreft-positions "
                f"{name}=f1+l1`, or convert it once with reftlib.interop.convert_pyreft_checkpoint(src, dst, "
                "positions='f1+l1') and serve dst"
            )
        directory = root
    elif pyreft_positions is not None:
        raise AdapterError(f"adapter {name!r}: pyreft positions {pyreft_positions!r} were given, but {root} is a reftlib "
                           "adapter, which records its own positions; drop them")
    else:
        directory = resolve_adapter_folder(name, root)
    config_dict, tensors = read_adapter(directory)
    config_dict = dict(config_dict)
    if pyreft_positions is not None:
        try:
            config_dict = with_positions(config_dict, pyreft_positions)
        except PositionError as exc:
            raise AdapterError(f"adapter {name!r}: pyreft positions {pyreft_positions!r}: {exc}") from None
    if config_dict.pop("extra", None) is not None:
        raise AdapterError(f"{directory} carries extra model state (e.g. a classification head), which serving "
                           "cannot run; serve only generation adapters")
    tensors, extra = split_extra(tensors)
    if extra:
        raise AdapterError(f"{directory} carries extra tensors {sorted(extra)} (a model subclass's head), which "
                           "serving cannot run; serve only generation adapters")
    try:
        config = ReftConfig.from_dict(config_dict)
    except ReftConfigError as exc:
        raise CheckpointError(f"cannot read the config in {directory}: {exc}") from exc
    saved_type, model_type = config.base_model_type, model_config.get("model_type")
    if saved_type is not None and saved_type != model_type:
        raise AdapterError(f"{directory} was trained on a {saved_type!r} model; the served model is {model_type!r}")
    layers, hidden, heads, head_dim = model_dimensions(model_config)
    modules = nn.ModuleDict()
    served: list[ServedIntervention] = []
    positions: list[tuple[str, str | None]] = []
    for rep in config.representations:
        if rep.component not in SERVED_COMPONENTS:
            raise AdapterError(
                f"adapter {name!r} ({directory}) intervenes on {rep.component!r}, which serving does not support; "
                f"supported components: {list(SERVED_COMPONENTS)}. Use ReftModel.generate for this adapter"
            )
        layer = rep.layer
        if not isinstance(layer, int) or not -layers <= layer < layers:
            raise AdapterError(f"adapter {name!r} intervenes on layer {layer}, but the model has {layers} layers")
        layer %= layers
        key = rep.name or f"layer_{layer}_{rep.component}"
        intervention = rep.intervention
        try:
            if rep.component == "head_output":
                intervention.build(heads * head_dim, num_heads=heads, head_dim=head_dim)
            else:
                if intervention.unit == "h.pos":
                    raise ReftConfigError(f"{type(intervention).__name__} needs component='head_output'")
                intervention.build(hidden)
        except ReftConfigError as exc:
            raise AdapterError(f"adapter {name!r} ({directory}) does not fit the served model: {exc}") from exc
        modules[key] = intervention
        served.append(ServedIntervention(key, layer, rep.component, intervention,
                                         heads if rep.component == "head_output" else None))
        positions.append((key, rep.positions))
    problem = state_dict_mismatch(modules.state_dict(), tensors)
    if problem:
        raise CheckpointError(f"{directory}: {problem}")
    modules.load_state_dict(dict(tensors), strict=True)
    modules.eval().requires_grad_(False)
    return ServedAdapter(name, str(directory), tuple(served), tuple(positions), pyreft_positions)


def load_served_adapters(adapters: Mapping[str, str | os.PathLike], model_config: Mapping[str, Any],
                         pyreft_positions: Mapping[str, str] | None = None) -> dict[str, ServedAdapter]:
    """``{name: folder}`` adapters built by :func:`load_served_adapter`, ``pyreft_positions[name]`` given to
    the pyreft folders; positions for a name that is not among ``adapters`` are refused."""
    pyreft_positions = dict(pyreft_positions or {})
    unknown = sorted(set(pyreft_positions) - set(adapters))
    if unknown:
        raise AdapterError(f"pyreft positions were given for {unknown}, which are not among the adapters "
                           f"{sorted(adapters)}; name the adapter as in adapters (--adapter NAME=FOLDER)")
    return {name: load_served_adapter(name, folder, model_config, pyreft_positions=pyreft_positions.get(name))
            for name, folder in adapters.items()}


def flat_edit_indices(plan: CallPlan, key: str, start: int, count: int, prompt_length: int) -> torch.Tensor | None:
    """Which of one request's ``count`` tokens at absolute positions ``[start, start + count)`` ``key`` edits.

    Returns offsets into those tokens (``None``: none of them). Position-restricted interventions
    edit their prompt positions (prefill only, whatever chunk the prompt is split into); interventions
    on every position edit every token, prompt and generated.
    """
    pos = plan.positions[key]
    if pos is None:
        return torch.arange(count) if plan.generated_keys is None or key in plan.generated_keys else None
    wanted = pos[pos >= 0]
    wanted = wanted[(wanted >= start) & (wanted < start + count) & (wanted < prompt_length)]
    return (wanted - start) if wanted.numel() else None


def read_model_config(model: str | os.PathLike) -> dict[str, Any]:
    """The base model's ``config.json`` as a dict (a local folder, or a Hub id through transformers)."""
    path = Path(model)
    if (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    if path.exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") > 1:
        raise CheckpointError(f"{str(model)!r} is not a model folder (no config.json there); give the folder of a "
                              "Hugging Face model or a Hub id such as HuggingFaceTB/SmolLM2-135M-Instruct")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the config of model {str(model)!r} ({exc}); give a local model folder "
                              "or a Hub id that is cached or reachable") from exc
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return config.to_dict()
