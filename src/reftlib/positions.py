"""Intervention positions: parsing specs and normalizing ``unit_locations``.

Positions are indices into the sequence dimension of the inputs as given (after padding).
Internally every intervention gets either ``None`` (all positions) or a ``[batch, n]``
``LongTensor`` in which ``-1`` marks padding: padded entries are masked and never written.

Specs (``"l1"``, ``"f3+l3"``, ``"all"``) are resolved per row from the attention mask, so
they land on real tokens with left or right padding alike. ``"l1"`` is always the *last real
token* of the row (for a prompt: the last prompt token).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import PositionError

_SPEC_PART = re.compile(r"^([fl])(\d+)$")


def parse_position_spec(spec: str) -> tuple[int, int] | None:
    """Parse ``"f{n}"``, ``"l{n}"``, ``"f{n}+l{m}"`` into ``(n_first, n_last)``; ``"all"`` -> None."""
    if not isinstance(spec, str):
        raise PositionError(f"a position spec must be a string like 'l1' or 'f7+l7', got {spec!r}")
    text = spec.strip().lower()
    if text == "all":
        return None
    first = last = 0
    parts = text.split("+")
    for part in parts:
        match = _SPEC_PART.match(part.strip())
        if not match:
            raise PositionError(
                f"cannot parse position spec {spec!r}; use 'all', 'f<n>' (first n tokens), 'l<n>' (last n) or 'f<n>+l<m>'"
            )
        kind, n = match.group(1), int(match.group(2))
        if n < 1:
            raise PositionError(f"position spec {spec!r} asks for {n} tokens; use at least 1")
        if kind == "f":
            if first:
                raise PositionError(f"position spec {spec!r} gives 'f' twice")
            first = n
        else:
            if last:
                raise PositionError(f"position spec {spec!r} gives 'l' twice")
            last = n
    return first, last


def split_position_spec(spec: str, share_weights: bool = False) -> tuple[str, str] | None:
    """The ``("f<n>", "l<m>")`` halves of a two-part spec whose parts go to different interventions, else None.

    pyreft's convention for ``"f<n>+l<m>"`` with ``share_weights=False``: the first half of the
    interventions acts on the first ``n`` prompt tokens and the second half on the last ``m``
    (configs list each layer twice). Returns ``None`` when nothing is split: ``share_weights=True``
    (every intervention gets the whole spec), a one-part spec (``"l1"``, ``"f3"``) or ``"all"``.
    The data modules (each half resolved on its own, as at generation), ``reftlib train``
    (:class:`reftlib.train_config.TrainConfig`) and the positions saved with trained interventions
    all follow this one rule. An unparsable spec
    raises :class:`~reftlib.errors.PositionError`.
    """
    parsed = parse_position_spec(spec)
    if share_weights or parsed is None or not (parsed[0] and parsed[1]):
        return None
    return f"f{parsed[0]}", f"l{parsed[1]}"


def resolve_position_spec(spec: str, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Positions ``[batch, n_first + n_last]`` for each row's real tokens (``-1`` where a row is too short).

    Overlaps between the first and last tokens of short rows are masked (each token once);
    the returned tensor never contains duplicate positions within a row.
    """
    parsed = parse_position_spec(spec)
    if parsed is None:
        return None
    n_first, n_last = parsed
    mask = attention_mask.detach().to("cpu").bool()
    batch, length = mask.shape
    real = torch.where(mask, torch.arange(length).expand(batch, length), torch.full_like(mask, length, dtype=torch.long))
    ordered = real.sort(dim=1).values  # real positions first, in order, then `length` fillers
    counts = mask.sum(dim=1, keepdim=True)
    cols = []
    if n_first:
        idx = torch.arange(n_first).expand(batch, n_first)
        first = ordered.gather(1, idx.clamp(max=length - 1)) if length else torch.full((batch, n_first), -1)
        cols.append(torch.where(idx < counts, first, -1))
    if n_last:
        idx = counts - n_last + torch.arange(n_last).expand(batch, n_last)  # index into real tokens
        last = ordered.gather(1, idx.clamp(min=0, max=max(length - 1, 0))) if length else torch.full((batch, n_last), -1)
        valid = idx >= 0
        if n_first:
            valid &= idx >= n_first  # already covered by the first-n part
        cols.append(torch.where(valid, last, -1))
    return torch.cat(cols, dim=1).long()


def _depth(value: Any) -> int:
    depth = 0
    while isinstance(value, (list, tuple)) and len(value) > 0:
        depth += 1
        value = value[0]
    if isinstance(value, torch.Tensor):
        depth += value.dim()
    return depth


def as_position_tensor(value: Any, where: str) -> torch.Tensor:
    """A ``[batch, n]`` LongTensor from nested lists or a tensor (rows may be ragged: padded with -1)."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu")
        if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
            raise PositionError(f"{where}: positions must be integers, got a {tensor.dtype} tensor")
        if tensor.dim() == 1:
            raise PositionError(
                f"{where}: positions must be [batch, n_positions], got shape {tuple(tensor.shape)}; "
                "for one example wrap it: [[...]]"
            )
        if tensor.dim() != 2:
            raise PositionError(f"{where}: positions must be [batch, n_positions], got shape {tuple(tensor.shape)}")
        return tensor.long()
    if not isinstance(value, (list, tuple)):
        raise PositionError(f"{where}: positions must be a tensor or nested lists, got {type(value).__name__}")
    rows = []
    for i, row in enumerate(value):
        if isinstance(row, torch.Tensor):
            row = row.tolist()
        if not isinstance(row, (list, tuple)) or any(isinstance(x, (list, tuple)) for x in row):
            raise PositionError(
                f"{where}: row {i} must be a flat list of positions, got {row!r}; expected [batch][n_positions]"
            )
        for x in row:
            if isinstance(x, bool) or (not isinstance(x, int) and not (hasattr(x, "__index__") and not isinstance(x, float))):
                raise PositionError(f"{where}: row {i} contains {x!r}; positions must be integers")
        rows.append([int(x) for x in row])
    width = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), width)


def validate_positions(positions: torch.Tensor, batch: int, length: int, where: str) -> torch.Tensor:
    """Check shape, range and uniqueness; returns the tensor unchanged."""
    if positions.shape[0] != batch:
        raise PositionError(
            f"{where}: positions have batch size {positions.shape[0]} but the inputs have {batch} rows "
            f"(positions shape {tuple(positions.shape)})"
        )
    if positions.numel():
        low, high = int(positions.min()), int(positions.max())
        if low < -1:
            raise PositionError(
                f"{where}: negative position {low}; positions index tokens from 0 (use -1 only to mark padding). "
                "For 'last token' use the spec 'l1'"
            )
        if high >= length:
            raise PositionError(
                f"{where}: position {high} is out of range for sequences of length {length} (valid 0..{length - 1})"
            )
        ordered = positions.sort(dim=1).values
        dup = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
        if bool(dup.any()):
            row = int(dup.any(dim=1).nonzero()[0])
            raise PositionError(
                f"{where}: row {row} lists the same position twice ({positions[row].tolist()}); "
                "list each position once (use -1 for padding)"
            )
    return positions


def normalize_unit_locations(
    unit_locations: Any,
    keys: Sequence[str],
    default_specs: Mapping[str, str | None],
    attention_mask: torch.Tensor,
) -> dict[str, torch.Tensor | None]:
    """Map any accepted ``unit_locations`` form to ``{key: [batch, n] positions or None}``.

    Accepted forms:
      * ``None``: each intervention's configured default spec (``None`` = all positions);
      * a spec string (``"l1"``, ``"f7+l7"``, ``"all"``) for every intervention;
      * a ``[batch, n]`` tensor / nested list for every intervention;
      * a ``[n_interventions, batch, n]`` tensor / nested list, one entry per intervention;
      * a dict keyed by intervention key or index, values of any of the above;
      * pyreft's ``{"sources->base": (None, [[[...]]])}`` (``[intervention][batch][position]``).
    """
    batch, length = attention_mask.shape
    n = len(keys)

    def one(value: Any, key: str) -> torch.Tensor | None:
        if value is None:
            spec = default_specs.get(key)
            return None if spec is None else resolve_position_spec(spec, attention_mask)
        if isinstance(value, str):
            return resolve_position_spec(value, attention_mask)
        tensor = as_position_tensor(value, f"unit_locations for {key!r}")
        return validate_positions(tensor, batch, length, f"unit_locations for {key!r}")

    if isinstance(unit_locations, Mapping):
        if "sources->base" in unit_locations or "base" in unit_locations:
            value = unit_locations.get("sources->base", unit_locations.get("base"))
            if isinstance(value, tuple) and len(value) == 2:
                if value[0] is not None:
                    raise PositionError("source positions are not supported (reftlib has no interchange sources); pass (None, base_positions)")
                value = value[1]
            return _per_intervention(value, keys, one)
        unknown = [k for k in unit_locations if not (isinstance(k, int) and 0 <= k < n) and k not in keys]
        if unknown:
            raise PositionError(f"unit_locations names unknown interventions {unknown}; known keys are {list(keys)}")
        by_key = {keys[k] if isinstance(k, int) else k: v for k, v in unit_locations.items()}
        return {key: one(by_key.get(key), key) for key in keys}
    if unit_locations is None or isinstance(unit_locations, str):
        return {key: one(unit_locations, key) for key in keys}
    return _per_intervention(unit_locations, keys, one, allow_broadcast=True)


def _per_intervention(value: Any, keys: Sequence[str], one, allow_broadcast: bool = True) -> dict:
    depth = _depth(value)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) or v is None for v in value):
        depth = 1  # a list of specs, one per intervention
    if depth == 2 and allow_broadcast:
        return {key: one(value, key) for key in keys}
    if depth in (1, 3):
        items = list(value)
        if len(items) != len(keys):
            raise PositionError(
                f"unit_locations gives positions for {len(items)} intervention(s) but the model has {len(keys)} "
                f"({list(keys)}); expected shape [n_interventions][batch][n_positions]"
            )
        return {key: one(item, key) for key, item in zip(keys, items)}
    if depth == 4:
        raise PositionError(
            "unit_locations has 4 levels of nesting (pyvene's per-head form); reftlib head interventions "
            "carry their heads in the intervention, so give [n_interventions][batch][n_positions]"
        )
    raise PositionError(
        f"cannot read unit_locations of nesting depth {depth}; expected [batch][n_positions] "
        "or [n_interventions][batch][n_positions]"
    )


def last_position(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[batch, 1]`` index of each row's last real token (left or right padding)."""
    return resolve_position_spec("l1", attention_mask)
