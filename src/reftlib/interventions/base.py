"""The intervention base class and the registry of intervention types.

An intervention is a small ``nn.Module`` that edits a hidden representation ``h`` (the
vectors at the chosen positions of one site). Built-in interventions are *additive*: they
implement :meth:`Intervention.edit`, returning the change ``Φ(h) − h``; the base class turns
that into ``forward(h) = h + dropout(edit(h))``. Dropout therefore acts on the edit, never on
the hidden state itself.

Writing your own::

    @register_intervention("scaled_steer")
    class ScaledSteer(Intervention):
        def __init__(self, *, embed_dim=None, scale=1.0, **kwargs):
            super().__init__(embed_dim=embed_dim, scale=scale, **kwargs)

        def build_parameters(self):               # called once embed_dim is known
            self.vector = nn.Parameter(torch.zeros(self.embed_dim))

        def edit(self, h):                         # return the change, same shape as h
            return self.config["scale"] * self.vector.expand_as(h)

Subclasses may instead override ``forward(h)`` and return the new representation; reftlib then
uses ``forward(h) − h`` as the edit. Head interventions (``unit = "h.pos"``) receive
``[..., num_heads, head_dim]`` tensors.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import CheckpointError, MergeError, ReftConfigError
from .rotation import OrthonormalRows
from .steps import track

_REGISTRY: dict[str, type[Intervention]] = {}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def dtype_from_name(value: str | torch.dtype | None) -> torch.dtype:
    """Accept ``torch.bfloat16``, ``"bfloat16"`` or ``"torch.bfloat16"``."""
    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise ReftConfigError(f"dtype {value!r} is not supported; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def register_intervention(name: str):
    """Class decorator adding an intervention type to the registry under ``name``.

    Only registered types can be named in a config or loaded from a checkpoint: loading never
    imports or executes code named by a file, so extending the registry is always explicit.
    """

    def decorator(cls: type[Intervention]) -> type[Intervention]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ReftConfigError(
                f"intervention type {name!r} is already registered to {_REGISTRY[name].__name__}; pick another name"
            )
        cls.type_name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def intervention_class(name_or_cls: str | type[Intervention]) -> type[Intervention]:
    """Look up an intervention type by registered name (case-insensitive; class names work too)."""
    if isinstance(name_or_cls, type):
        if not issubclass(name_or_cls, Intervention):
            raise ReftConfigError(f"{name_or_cls.__name__} is not a reftlib Intervention subclass")
        return name_or_cls
    key = str(name_or_cls)
    if key in _REGISTRY:
        return _REGISTRY[key]
    lowered = key.lower().removesuffix("intervention")
    for name, cls in _REGISTRY.items():
        if lowered in (name.lower(), cls.__name__.lower().removesuffix("intervention")):
            return cls
    raise ReftConfigError(
        f"unknown intervention type {name_or_cls!r}; registered types are {sorted(_REGISTRY)}. "
        "Register your own class with @reftlib.register_intervention('name')."
    )


def registered_interventions() -> dict[str, type[Intervention]]:
    """A copy of the registry: type name -> class."""
    return dict(_REGISTRY)


class Intervention(nn.Module):
    """Base class of all interventions.

    Constructor keyword arguments are remembered in ``self.config`` and saved with the
    checkpoint, so a subclass can be rebuilt from JSON alone. Dimensions are optional: when
    ``embed_dim`` (or ``num_heads``/``head_dim`` for head interventions) is omitted it is
    inferred when the intervention is attached to a model; when given it is checked.
    """

    type_name: ClassVar[str] = ""
    #: ``"pos"`` edits ``[..., embed_dim]`` vectors; ``"h.pos"`` edits ``[..., heads, head_dim]``.
    unit: ClassVar[str] = "pos"

    def __init__(
        self,
        *,
        embed_dim: int | None = None,
        dtype: str | torch.dtype | None = torch.float32,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        kwargs.pop("device", None)  # pyreft accepts device=; reftlib places interventions on their layer's device
        unknown = set(kwargs) - self._accepted_arguments()
        if unknown:
            raise ReftConfigError(
                f"unknown argument(s) {sorted(unknown)} for {type(self).__name__}; "
                f"accepted: {sorted(self._accepted_arguments() | {'embed_dim', 'dtype', 'dropout'})}"
            )
        if not 0.0 <= float(dropout) < 1.0:
            raise ReftConfigError(f"dropout must be in [0, 1), got {dropout}")
        self.config: dict[str, Any] = {"dtype": dtype_name(dtype_from_name(dtype)), "dropout": float(dropout), **kwargs}
        self.embed_dim: int | None = None
        self.dropout = nn.Dropout(float(dropout))
        self._built = False
        self._claimed = False
        self._requested_embed_dim = embed_dim
        track(self)
        if embed_dim is not None and self.unit == "pos":
            self.build(embed_dim=embed_dim)

    # -- construction -----------------------------------------------------------------
    @classmethod
    def _accepted_arguments(cls) -> set[str]:
        """Keyword arguments declared by the ``__init__`` of this class and its bases."""
        names: set[str] = set()
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass is Intervention:
                continue
            for param in inspect.signature(init).parameters.values():
                if param.kind is param.KEYWORD_ONLY or param.kind is param.POSITIONAL_OR_KEYWORD:
                    names.add(param.name)
        names.discard("self")
        return names

    @property
    def dtype(self) -> torch.dtype:
        return dtype_from_name(self.config["dtype"])

    @property
    def is_built(self) -> bool:
        return self._built

    def build(self, embed_dim: int, num_heads: int | None = None, head_dim: int | None = None) -> None:
        """Create the parameters for a site of width ``embed_dim`` (called on attach).

        Raises :class:`ReftConfigError` when an explicitly given dimension disagrees.
        """
        if self._requested_embed_dim is not None and self._requested_embed_dim != embed_dim:
            raise ReftConfigError(
                f"{type(self).__name__} was created with embed_dim={self._requested_embed_dim} but the site it is "
                f"attached to has width {embed_dim}; drop embed_dim (it is inferred) or pick a matching component"
            )
        if self._built:
            return
        self.embed_dim = int(embed_dim)
        self.build_parameters()
        self.to(self.dtype)
        for module in self.modules():  # rotations are parametrized in fp32 whatever the intervention dtype
            if isinstance(module, OrthonormalRows):
                module.float()
        self._built = True

    def claim(self) -> bool:
        """Mark this instance as owned by a model; ``False`` when a model already owns it.

        A model attaching a config adopts the instances nobody owns yet (pyreft style: the caller's
        handle stays live) and copies the others (:meth:`clone`), so models never share parameters.
        """
        if self._claimed:
            return False
        self._claimed = True
        return True

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Copies and unpickled instances get the post-optimizer-step hook too (``__init__`` does not run)."""
        super().__setstate__(state)
        track(self)

    def clone(self) -> Intervention:
        """A deep copy (same values, new parameters) that no model owns yet."""
        twin = copy.deepcopy(self)
        twin._claimed = False
        return twin

    def build_parameters(self) -> None:  # pragma: no cover - every built-in overrides it
        """Create parameters; ``self.embed_dim`` (and head sizes) are set when this runs."""

    def get_config(self) -> dict[str, Any]:
        """Everything needed to rebuild this intervention: its type and constructor arguments."""
        return {"type": self.type_name, "embed_dim": self.embed_dim, **self.config}

    # -- pyreft checkpoints ---------------------------------------------------------------
    @classmethod
    def from_pyreft_state(
        cls, state: Mapping[str, torch.Tensor], where: object
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], set[str]]:
        """Read the ``state_dict`` pyreft saved for this method's pyreft counterpart.

        Returns ``(parameters under reftlib's names, constructor arguments, keys of state read)``;
        the arguments include ``embed_dim`` and ``low_rank_dimension``. Methods without a pyreft
        counterpart raise :class:`~reftlib.errors.CheckpointError`.
        """
        raise CheckpointError(f"{where}: {cls.__name__} has no pyreft counterpart to convert from")

    # -- training and merging -------------------------------------------------------------
    def after_optimizer_step(self) -> None:
        """Called after every optimizer step that updated one of this intervention's parameters.

        Override to keep parameters on a constraint set (re-normalize a direction, clamp a scale).
        Rotations inside an intervention take care of themselves (their own hook retracts them).
        """

    #: Whether :meth:`fold_into` can fold this edit into the projection that reads the site.
    foldable: ClassVar[bool] = False

    def fold_into(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Fold this edit into the linear map ``y = z @ weight + bias`` that reads the edited ``z``.

        ``weight`` (``[in, out]``) and ``bias`` (``[out]``) are fp32 copies (fp64 for a float64 model),
        edited in place so that
        the projection of the *unedited* ``z`` equals the projection of the edited one, at every
        position. Only edits that are affine in ``z`` with constant coefficients can do this (LoFiT's
        head scales and offsets); input-dependent edits such as LoReFT's cannot and raise.
        """
        raise MergeError(
            f"{type(self).__name__} is not foldable into the model's weights: its edit depends on the hidden "
            "state. Keep using the ReftModel (or merge only the foldable adapters)"
        )

    # -- math ---------------------------------------------------------------------------
    def edit(self, h: torch.Tensor) -> torch.Tensor:
        """The additive change ``Φ(h) − h`` (default: derived from an overridden ``forward``)."""
        return self.forward(h) - h

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """The intervened representation ``h + dropout(edit(h))``."""
        return h + self.delta(h)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """The change actually applied by reftlib's hooks, in ``h``'s dtype (dropout included)."""
        if type(self).forward is not Intervention.forward:
            return (self.forward(h) - h).to(h.dtype)
        return self.dropout(self.edit(h)).to(h.dtype)

    def extra_repr(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.get_config().items() if k != "type")
        return args


class HeadIntervention(Intervention):
    """Base for interventions on per-head attention outputs (``unit = "h.pos"``).

    Receives tensors shaped ``[..., num_heads, head_dim]`` (the attention output just before
    the output projection, split into heads).
    """

    unit: ClassVar[str] = "h.pos"

    def __init__(self, *, num_heads: int | None = None, head_dim: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_heads: int | None = None
        self.head_dim: int | None = None
        self._requested_heads = (num_heads, head_dim)
        if num_heads is not None and head_dim is not None:
            self.build(num_heads * head_dim, num_heads=num_heads, head_dim=head_dim)

    def build(self, embed_dim: int, num_heads: int | None = None, head_dim: int | None = None) -> None:
        if num_heads is None or head_dim is None:
            raise ReftConfigError(
                f"{type(self).__name__} edits attention heads; attach it to component 'head_output' "
                "(or give num_heads= and head_dim=)"
            )
        for name, wanted, actual in (("num_heads", self._requested_heads[0], num_heads),
                                     ("head_dim", self._requested_heads[1], head_dim)):
            if wanted is not None and wanted != actual:
                raise ReftConfigError(
                    f"{type(self).__name__} was created with {name}={wanted} but the model has {name}={actual}; "
                    f"drop {name} (it is inferred from the model) or fix it"
                )
        if self._built:
            return
        self.num_heads, self.head_dim = int(num_heads), int(head_dim)
        super().build(embed_dim)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "num_heads": self.num_heads, "head_dim": self.head_dim}
