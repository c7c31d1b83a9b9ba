"""What to attach where: :class:`ReftConfig` and :class:`RepresentationConfig`.

A representation names a *site* (``layer`` + ``component``, or a module path) and the
intervention to apply there. Configs are data: they round-trip through JSON losslessly, the
intervention stored as its registered type name plus every constructor argument
(:attr:`RepresentationConfig.intervention_config`). Modules are built when a config is attached
to a model, and a model works on its own copy of the config (nothing is written back into the
caller's). An :class:`~reftlib.Intervention` instance given pyreft-style is adopted by the first
model it is attached to; any later model gets a copy of it (same values, its own parameters), so
two models never share intervention parameters.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_bytes
from .components import COMPONENTS, is_module_path
from .errors import ReftConfigError
from .interventions import Intervention, intervention_class
from .positions import parse_position_spec

FORMAT_NAME = "reftlib"
#: The file name of a saved config (the same as in folders written by ``ReftModel.save_pretrained``).
CONFIG_FILE_NAME = "reft_config.json"
#: 2: rotations (``*.rotate_layer.raw``) are stored in the mixed basis of
#: :mod:`reftlib.interventions.rotation`; version-1 files (hidden-state basis) are converted on reading.
FORMAT_VERSION = 2
#: The name of a model's first adapter unless another is given (also re-exported by :mod:`reftlib.model`).
DEFAULT_ADAPTER = "default"

_REPRESENTATION_KEYS = {
    "layer", "component", "low_rank_dimension", "intervention", "intervention_type", "intervention_kwargs",
    "unit", "max_number_of_units", "positions", "name",
    # accepted for pyreft compatibility, with no effect on reftlib
    "subspace_partition", "group_key", "intervention_link_key", "moe_key", "source_representation",
    "hidden_source_representation", "latent_dim",
}
_CONFIG_KEYS = {"format", "format_version", "base_model_name_or_path", "base_model_type", "representations"}
_PYREFT_IGNORED = {"subspace_partition", "group_key", "intervention_link_key", "moe_key", "latent_dim"}


@dataclass
class RepresentationConfig:
    """One intervention site.

    Args:
        layer: index into the model's layer list (negative counts from the end). ``None`` only
            with a module-path component.
        component: one of :data:`COMPONENTS`, or a module path such as ``"model.layers.3.mlp"``
            (its output) or ``"model.layers.3.mlp:input"`` (its first input).
        intervention: an :class:`~reftlib.Intervention` instance, a registered type name
            (``"loreft"``, ``"direft"``, ``"head_bias"`` ...) or class. Default ``"loreft"``.
        low_rank_dimension: rank r for low-rank types (forwarded to the intervention).
        intervention_kwargs: extra constructor arguments when ``intervention`` is a name/class.
        unit: ``"pos"`` (vectors) or ``"h.pos"`` (attention heads); inferred from the
            intervention, checked when given.
        max_number_of_units: pyreft compatibility (number of positions); informational.
        positions: default positions when a call gives none: ``"all"``, ``"l1"`` (last
            token), ``"f3"``, ``"f7+l7"`` ... resolved per row from the attention mask. ``None``
            means all positions.
        name: the key of this intervention (default ``layer_{layer}_{component}``).
    """

    layer: int | None = None
    component: str = "block_output"
    intervention: Any = None
    low_rank_dimension: int | None = None
    intervention_kwargs: dict[str, Any] = field(default_factory=dict)
    unit: str | None = None
    max_number_of_units: int = 1
    positions: str | None = None
    name: str | None = None
    #: The intervention's type and constructor arguments when the config was made (pure data): what
    #: :meth:`to_dict` saves while unbound, and what a model that cannot adopt the instance builds from.
    intervention_config: dict[str, Any] = field(init=False, repr=False, compare=False, default_factory=dict)
    #: Whether ``intervention`` was given as an instance (pyreft style) rather than a type name.
    instance_given: bool = field(init=False, repr=False, compare=False, default=False)
    #: Whether :meth:`bind` tied this representation to a model's module.
    bound: bool = field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self) -> None:
        if not isinstance(self.component, str) or not self.component:
            raise ReftConfigError(f"component must be a non-empty string; use one of {list(COMPONENTS)} or a module path")
        if self.component not in COMPONENTS and not is_module_path(self.component):
            raise ReftConfigError(
                f"unknown component {self.component!r}; use one of {list(COMPONENTS)} "
                "or a module path such as 'model.layers.3.mlp'"
            )
        if is_module_path(self.component):
            if self.layer is not None:
                raise ReftConfigError(
                    f"component {self.component!r} is a module path, which already names the layer; drop layer={self.layer}"
                )
        elif not isinstance(self.layer, int) or isinstance(self.layer, bool):
            raise ReftConfigError(f"layer must be an integer layer index, got {self.layer!r}")
        if self.intervention is None:
            self.intervention = "loreft"
        self.instance_given = isinstance(self.intervention, Intervention)
        if not self.instance_given:
            cls = intervention_class(self.intervention)  # raises for unknown names
            kwargs = dict(self.intervention_kwargs)
            if self.low_rank_dimension is not None:
                kwargs.setdefault("low_rank_dimension", self.low_rank_dimension)
            try:
                self.intervention = cls(**kwargs)
            except TypeError as exc:
                raise ReftConfigError(f"cannot build {cls.__name__} from {kwargs}: {exc}") from exc
        iv = self.intervention
        rank = iv.config.get("low_rank_dimension")
        if self.low_rank_dimension is not None and rank is not None and rank != self.low_rank_dimension:
            raise ReftConfigError(
                f"low_rank_dimension={self.low_rank_dimension} disagrees with the intervention's "
                f"low_rank_dimension={rank}; give it once"
            )
        self.low_rank_dimension = rank
        if self.unit is None:
            self.unit = iv.unit
        if self.unit not in ("pos", "h.pos"):
            raise ReftConfigError(f"unit must be 'pos' or 'h.pos', got {self.unit!r}")
        if self.unit != iv.unit:
            raise ReftConfigError(
                f"unit={self.unit!r} does not match {type(iv).__name__}, which works on unit {iv.unit!r}"
            )
        if iv.unit == "h.pos" and self.component != "head_output":
            raise ReftConfigError(
                f"{type(iv).__name__} edits attention heads and needs component='head_output', got {self.component!r}"
            )
        if self.positions is not None:
            parse_position_spec(self.positions)  # validates
        if not isinstance(self.max_number_of_units, int) or self.max_number_of_units < 1:
            raise ReftConfigError(f"max_number_of_units must be a positive integer, got {self.max_number_of_units!r}")
        self.intervention_config = copy.deepcopy(iv.get_config())

    def new_intervention(self) -> Intervention:
        """The module for a model that cannot adopt :attr:`intervention` (another model owns it).

        An instance the caller gave is copied, values included (its parameters may hold computed
        values, e.g. ITI's offsets); one built from a type name is built afresh from
        :attr:`intervention_config`. Either way the new module shares no parameter with the old one.
        """
        if self.instance_given:
            return self.intervention.clone()
        return intervention_from_config(self.intervention_config)

    def copy(self) -> RepresentationConfig:
        """A copy holding the same intervention instance (to be adopted or replaced by a model)."""
        clone = copy.copy(self)
        clone.intervention_kwargs = dict(self.intervention_kwargs)
        clone.intervention_config = copy.deepcopy(self.intervention_config)
        clone.bound = False
        return clone

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RepresentationConfig:
        """Build from a pyreft-style dict or a serialized one (``intervention`` as a dict)."""
        if isinstance(data, RepresentationConfig):
            return data
        if not isinstance(data, Mapping):
            raise ReftConfigError(f"a representation must be a dict, got {type(data).__name__}")
        unknown = set(data) - _REPRESENTATION_KEYS
        if unknown:
            raise ReftConfigError(
                f"unknown representation key(s) {sorted(unknown)}; allowed keys are {sorted(_REPRESENTATION_KEYS - _PYREFT_IGNORED)}"
            )
        data = {k: v for k, v in data.items() if k not in _PYREFT_IGNORED}
        data.pop("source_representation", None)
        data.pop("hidden_source_representation", None)
        if "intervention_type" in data:
            if data.get("intervention") is not None:
                raise ReftConfigError("give either 'intervention' or 'intervention_type', not both")
            data["intervention"] = data.pop("intervention_type")
        iv = data.get("intervention")
        if isinstance(iv, Mapping):
            data["intervention"] = intervention_from_config(iv)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "component": self.component,
            "unit": self.unit,
            "max_number_of_units": self.max_number_of_units,
            "positions": self.positions,
            "name": self.name,
            "intervention": self.intervention.get_config() if self.bound else copy.deepcopy(self.intervention_config),
        }

    def bind(self, module: Intervention) -> None:
        """Make ``module`` this representation's intervention for good (a model's own copy of a config).

        A bound representation describes its module as it is (dimensions and options as built); an
        unbound one keeps the arguments it was made with, whatever happens to the instance it holds.
        """
        self.intervention = module
        self.bound = True


def intervention_from_config(data: Mapping[str, Any]) -> Intervention:
    """Rebuild an intervention from :meth:`Intervention.get_config` output (allow-listed types only)."""
    data = dict(data)
    type_name = data.pop("type", None)
    if type_name is None:
        raise ReftConfigError(f"intervention config {data} has no 'type'; expected e.g. {{'type': 'loreft', ...}}")
    cls = intervention_class(type_name)
    try:
        return cls(**data)
    except TypeError as exc:
        raise ReftConfigError(f"cannot rebuild intervention {type_name!r} from {data}: {exc}") from exc


class ReftConfig:
    """The interventions of one adapter: a list of :class:`RepresentationConfig`.

    ``ReftConfig(representations={...})`` or ``ReftConfig(representations=[{...}, {...}])``
    with pyreft's keys (``layer``, ``component``, ``low_rank_dimension``, ``intervention``).
    """

    def __init__(
        self,
        representations: Mapping[str, Any] | RepresentationConfig | Iterable[Any],
        *,
        base_model_name_or_path: str | None = None,
        base_model_type: str | None = None,
        **pyreft_kwargs: Any,
    ) -> None:
        ignored = set(pyreft_kwargs) - {"intervention_types", "sorted_keys", "intervention_dimensions", "mode"}
        if ignored:
            raise ReftConfigError(
                f"unknown ReftConfig argument(s) {sorted(ignored)}; allowed: representations, "
                "base_model_name_or_path, base_model_type"
            )
        if isinstance(representations, (Mapping, RepresentationConfig)):
            representations = [representations]
        reps = [RepresentationConfig.from_dict(r) for r in representations]
        if not reps:
            raise ReftConfigError("representations is empty; give at least one {'layer': ..., 'component': ...}")
        seen: set[int] = set()
        for r in reps:
            if id(r.intervention) in seen:
                raise ReftConfigError(
                    "the same intervention instance appears in two representations; create one per site"
                )
            seen.add(id(r.intervention))
        self.representations: list[RepresentationConfig] = reps
        self.base_model_name_or_path = base_model_name_or_path
        self.base_model_type = base_model_type

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "base_model_name_or_path": self.base_model_name_or_path,
            "base_model_type": self.base_model_type,
            "representations": [r.to_dict() for r in self.representations],
        }

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def copy(self) -> ReftConfig:
        """An independent copy (new representation objects, the same intervention instances)."""
        return ReftConfig([rep.copy() for rep in self.representations],
                          base_model_name_or_path=self.base_model_name_or_path, base_model_type=self.base_model_type)

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write this config alone as ``reft_config.json`` in ``save_directory`` (atomically); returns the file."""
        path = Path(save_directory) / CONFIG_FILE_NAME
        atomic_write_bytes(path, (self.to_json_string() + "\n").encode("utf-8"))
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ReftConfig:
        """Read a config written by :meth:`save_pretrained` (or a folder saved by ``ReftModel.save_pretrained``)."""
        path = Path(path)
        file = path / CONFIG_FILE_NAME if path.is_dir() else path
        if not file.is_file():
            raise ReftConfigError(f"{file} does not exist; give a folder holding {CONFIG_FILE_NAME} or the file itself")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ReftConfigError(f"{file} is not valid JSON ({exc}); the file may be truncated") from exc
        if not isinstance(data, Mapping):
            raise ReftConfigError(f"{file} does not hold a reftlib config (expected a JSON object)")
        # A folder saved by ReftModel.save_pretrained may add entries of its own (e.g. a head's options).
        return cls.from_dict({k: v for k, v in data.items() if k in _CONFIG_KEYS})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReftConfig:
        if not isinstance(data, Mapping) or "representations" not in data:
            raise ReftConfigError("a ReftConfig dict needs a 'representations' list")
        if data.get("format", FORMAT_NAME) != FORMAT_NAME:
            raise ReftConfigError(f"config format {data.get('format')!r} is not a reftlib config")
        version = data.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ReftConfigError(
                f"this config was written by a newer reftlib (format version {version}; this reftlib reads up to "
                f"{FORMAT_VERSION}); upgrade with `pip install -U reftlib`"
            )
        unknown = set(data) - _CONFIG_KEYS
        if unknown:
            raise ReftConfigError(f"unknown ReftConfig key(s) {sorted(unknown)}; allowed keys are {sorted(_CONFIG_KEYS)}")
        reps = [copy.deepcopy(dict(r)) for r in data["representations"]]
        return cls(
            representations=reps,
            base_model_name_or_path=data.get("base_model_name_or_path"),
            base_model_type=data.get("base_model_type"),
        )

    @classmethod
    def from_json_string(cls, text: str) -> ReftConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ReftConfigError(f"the config is not valid JSON ({exc}); the file may be truncated") from exc
        return cls.from_dict(data)

    def __repr__(self) -> str:
        return f"ReftConfig({self.to_json_string()})"
