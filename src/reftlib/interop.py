"""Reading checkpoints written by pyreft / pyvene (``config.json`` + ``intkey_*.bin``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError


def read_pyreft_folder(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Convert a pyreft save folder to reftlib's ``(config dict, tensors)``."""
    raise CheckpointError(
        f"{directory} was saved by pyreft/pyvene; reading that format is not implemented yet in this version"
    )
