"""The collator of ReFT training batches: pads examples into tensors, intervention positions included.

:class:`ReftDataCollator` is what the data-module builders of :mod:`reftlib.training.data`
return as ``data_collator``. It pads a batch (right padding by default, positions unchanged;
left padding shifts every position by its row's padding) and builds the attention mask from the
true lengths, so a real token whose id equals the pad id is never masked. Positions use ``-1``
for padding, as everywhere in reftlib (:mod:`reftlib.positions`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import InputError, PositionError

#: Label value ignored by the loss (PyTorch's ``cross_entropy`` default): prompt tokens and padding.
IGNORE_INDEX = -100
_PAD_POSITION = -1  # an unused position slot (reftlib.positions' convention)

__all__ = ["IGNORE_INDEX", "ReftDataCollator"]


@dataclass
class ReftDataCollator:
    """Pad a list of examples into tensors: ``input_ids``, ``attention_mask``, ``labels``, ``intervention_locations``.

    * ``input_ids`` are padded with the tokenizer's pad id (an :class:`~reftlib.errors.InputError`
      tells how to set one when it is missing); ``attention_mask`` comes from each example's
      true length (or its own ``attention_mask``), never from comparing ids with the pad id.
    * Token-level ``labels`` are padded with ``-100``; per-example labels (classification) are
      stacked. ``token_level_labels=None`` decides from the data (labels as long as the ids).
    * ``intervention_locations`` (``[num_interventions, n]`` per example) are padded with ``-1``
      to ``[batch, num_interventions, max_n]``.
    * ``padding_side="right"`` (training default) keeps positions as they are; ``"left"`` shifts
      every non-padding position by the row's padding.

    ``data_collator=`` is accepted for pyreft compatibility (``ReftDataCollator(data_collator=
    DataCollatorForSeq2Seq(tokenizer, ...))``): only its tokenizer and ``pad_to_multiple_of`` are used.
    """

    tokenizer: Any = None
    data_collator: Any = None
    padding_side: Literal["right", "left"] = "right"
    pad_to_multiple_of: int | None = None
    pad_token_id: int | None = None
    label_pad_token_id: int = IGNORE_INDEX
    token_level_labels: bool | None = None

    def __post_init__(self) -> None:
        if self.tokenizer is None and self.data_collator is not None:
            self.tokenizer = getattr(self.data_collator, "tokenizer", None)
            if self.pad_to_multiple_of is None:
                self.pad_to_multiple_of = getattr(self.data_collator, "pad_to_multiple_of", None)
        if self.padding_side not in ("right", "left"):
            raise InputError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}")
        if self.pad_token_id is None:
            if self.tokenizer is None:
                raise InputError("ReftDataCollator needs a tokenizer (for its pad token) or pad_token_id=")
            self.pad_token_id = getattr(self.tokenizer, "pad_token_id", None)
            if self.pad_token_id is None:
                raise InputError(
                    "the tokenizer has no pad token; set one before building the data module, e.g. "
                    "`tokenizer.pad_token = tokenizer.eos_token` (the attention mask is built from lengths, so "
                    "padding with a real token id is safe)"
                )

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise InputError("cannot collate an empty batch")
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long).reshape(-1) for f in features]
        lengths = [len(row) for row in ids]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(features)
        left = self.padding_side == "left"
        offsets = [width - n if left else 0 for n in lengths]

        out: dict[str, torch.Tensor] = {}
        input_ids = torch.full((batch, width), int(self.pad_token_id), dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for i, (row, off) in enumerate(zip(ids, offsets)):
            input_ids[i, off:off + len(row)] = row
            given = features[i].get("attention_mask")
            attention_mask[i, off:off + len(row)] = 1 if given is None else torch.as_tensor(given, dtype=torch.long)
        out["input_ids"], out["attention_mask"] = input_ids, attention_mask

        first = features[0]
        if "labels" in first and first["labels"] is not None:
            out["labels"] = self._labels(features, lengths, offsets, width)
        if "intervention_locations" in first:
            out["intervention_locations"] = self._locations(features, offsets)
        if "token_type_ids" in first:
            types = torch.zeros((batch, width), dtype=torch.long)
            for i, (f, off) in enumerate(zip(features, offsets)):
                types[i, off:off + lengths[i]] = torch.as_tensor(f["token_type_ids"], dtype=torch.long)
            out["token_type_ids"] = types
        handled = {"input_ids", "attention_mask", "labels", "intervention_locations", "token_type_ids"}
        for key in first:
            if key in handled:
                continue
            values = [f[key] for f in features]
            try:
                out[key] = torch.as_tensor(values) if not isinstance(values[0], torch.Tensor) else torch.stack(values)
            except (TypeError, ValueError, RuntimeError):
                out[key] = values  # e.g. strings: kept as a list
        return out

    def _labels(self, features, lengths, offsets, width) -> torch.Tensor:
        values = [f["labels"] for f in features]
        token_level = self.token_level_labels
        if token_level is None:
            token_level = all(
                not isinstance(v, (int, float)) and getattr(v, "ndim", 1) == 1 and len(v) == n
                for v, n in zip(values, lengths)
            )
        if not token_level:
            return torch.as_tensor(values) if not isinstance(values[0], torch.Tensor) else torch.stack(values)
        labels = torch.full((len(values), width), self.label_pad_token_id, dtype=torch.long)
        for i, (value, off) in enumerate(zip(values, offsets)):
            row = torch.as_tensor(value, dtype=torch.long).reshape(-1)
            if len(row) != lengths[i]:
                raise InputError(f"example {i}: labels have {len(row)} entries but input_ids have {lengths[i]}")
            labels[i, off:off + len(row)] = row
        return labels

    @staticmethod
    def _locations(features, offsets) -> torch.Tensor:
        rows = [torch.as_tensor(f["intervention_locations"], dtype=torch.long) for f in features]
        for i, row in enumerate(rows):
            if row.dim() == 1:
                rows[i] = row = row.unsqueeze(0)
            if row.dim() != 2:
                raise PositionError(
                    f"example {i}: intervention_locations must be [num_interventions, n_positions], "
                    f"got shape {tuple(row.shape)}"
                )
        counts = {row.shape[0] for row in rows}
        if len(counts) != 1:
            raise PositionError(f"examples in one batch have different numbers of interventions: {sorted(counts)}")
        n_pos = max(row.shape[1] for row in rows)
        out = torch.full((len(rows), rows[0].shape[0], n_pos), _PAD_POSITION, dtype=torch.long)
        for i, (row, off) in enumerate(zip(rows, offsets)):
            if off:
                row = torch.where(row >= 0, row + off, row)
            out[i, :, :row.shape[1]] = row
        return out

