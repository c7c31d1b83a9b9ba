"""What to attach where: :class:`ReftConfig` and :class:`RepresentationConfig`.

A representation names a *site* (``layer`` + ``component``, or a module path) and the
intervention to apply there. Configs round-trip through JSON losslessly; the intervention is
stored as its registered type name plus every constructor argument (dimensions included).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .components import COMPONENTS, is_module_path
from .errors import ReftConfigError
from .interventions import Intervention, intervention_class
from .positions import parse_position_spec

FORMAT_NAME = "reftlib"
#: 2: rotations (``*.rotate_layer.raw``) are stored in the mixed basis of
#: :mod:`reftlib.interventions.rotation`; version-1 files (hidden-state basis) are converted on reading.
FORMAT_VERSION = 2

_REPRESENTATION_KEYS = {
    "layer", "component", "low_rank_dimension", "intervention", "intervention_type", "intervention_kwargs",
    "unit", "max_number_of_units", "positions", "name",
    # accepted for pyreft compatibility, with no effect on reftlib
    "subspace_partition", "group_key", "intervention_link_key", "moe_key", "source_representation",
    "hidden_source_representation", "latent_dim",
}
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
        if not isinstance(self.intervention, Intervention):
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
            "intervention": self.intervention.get_config(),
        }


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
        known = {"format", "format_version", "base_model_name_or_path", "base_model_type", "representations"}
        unknown = set(data) - known
        if unknown:
            raise ReftConfigError(f"unknown ReftConfig key(s) {sorted(unknown)}; allowed keys are {sorted(known)}")
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
