"""The errors reftlib raises. Every one is a :class:`ReftError`, and every message says what is
wrong and how to fix it."""

from __future__ import annotations


class ReftError(Exception):
    """Base class of every error raised by reftlib."""


class ReftConfigError(ReftError, ValueError):
    """A configuration value is unknown, missing or impossible."""


class ArchitectureError(ReftError):
    """The model's structure does not have what the configuration asks for."""


class PositionError(ReftError, ValueError):
    """Intervention positions (``unit_locations``) are malformed or out of range."""


class InputError(ReftError, ValueError):
    """Model inputs (token ids, masks, batch) are unusable."""


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
