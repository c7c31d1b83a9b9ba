"""Deprecated location of the DPO trainer: it moved to :mod:`reftlib.training.dpo`.

DPO works for any intervention, not only LoFiT's, so it lives with the other trainers. Import
from ``reftlib.training`` (or ``reftlib.training.dpo``); ``reftlib.lofit`` keeps exporting the same
names without a warning. This module will be removed in the next release.
"""

from __future__ import annotations

import warnings

from ..training.dpo import (
    AdapterDPOTrainer,
    ReftDPODataCollator,
    ReftDPOTrainer,
    dpo_loss,
    make_preference_data_module,
    make_preference_dataset,
    sequence_logps,
)

__all__ = [
    "AdapterDPOTrainer",
    "ReftDPODataCollator",
    "ReftDPOTrainer",
    "dpo_loss",
    "make_preference_data_module",
    "make_preference_dataset",
    "sequence_logps",
]

warnings.warn(
    "reftlib.lofit.dpo is deprecated and will be removed in the next release; import the DPO trainer and its "
    "helpers from reftlib.training (e.g. from reftlib.training import ReftDPOTrainer)",
    DeprecationWarning,
    stacklevel=2,
)
