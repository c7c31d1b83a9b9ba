"""The errors reftlib raises. Every one is a :class:`ReftError`, and every message says what is
wrong and how to fix it.

All of reftlib's exception classes are defined here (and only here), so ``except ReftError``
catches everything reftlib raises on purpose, and each class can be imported from
``reftlib.errors`` whatever feature raises it.
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "ArchitectureError",
    "ArgumentTypeError",
    "CheckpointError",
    "DeviceError",
    "InputError",
    "MergeError",
    "MissingDependencyError",
    "NumericalError",
    "PositionError",
    "PrefixUnavailable",
    "ReftConfigError",
    "ReftError",
    "RequestRefusedError",
]


class ReftError(Exception):
    """Base class of every error raised by reftlib."""


class ReftConfigError(ReftError, ValueError):
    """A configuration value is unknown, missing or impossible."""


class ArgumentTypeError(ReftConfigError, TypeError):
    """An argument is not the kind of object expected (e.g. a string where a model belongs).

    Raised at the entry points before any work is done, naming the function, the argument, what it
    expects and what it got. It is a :class:`ReftConfigError` and a ``TypeError``.
    """


class ArchitectureError(ReftError):
    """The model's structure does not have what the configuration asks for."""


class PositionError(ReftError, ValueError):
    """Intervention positions (``unit_locations``) are malformed or out of range."""


class InputError(ReftError, ValueError):
    """Model inputs (token ids, masks, batch) are unusable."""


class RequestRefusedError(InputError):
    """A served request the server answers with an HTTP error itself (an unknown model name, say)."""

    def __init__(self, status: int, message: str, error_type: str):
        super().__init__(message)
        self.status, self.error_type = status, error_type


class DeviceError(ReftError, RuntimeError):
    """An intervention and the hidden states it edits live on different devices."""


class CheckpointError(ReftError):
    """A saved intervention cannot be read or does not fit the model."""


class AdapterError(ReftError, KeyError):
    """An adapter name is unknown, duplicated or inconsistent with the batch."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class NumericalError(ReftError, FloatingPointError):
    """An intervention produced NaN or inf values (raised only when checks are enabled)."""


class MergeError(ReftError, ValueError):
    """Interventions cannot be folded into the model's weights (:meth:`reftlib.ReftModel.merge_and_unload`)."""


class MissingDependencyError(ReftError, ImportError):
    """An optional dependency needed for this feature is not installed (the message says what to install)."""


class PrefixUnavailable(ReftError):
    """The training prefix cache cannot serve this model or step; the message says why.

    Raised by the checks of :class:`reftlib.training.PrefixCache`: with ``prefix_cache="auto"``
    the trainer catches it, logs the reason and trains normally; with ``prefix_cache=True`` it is
    turned into a :class:`ReftConfigError`.
    """
