"""Where a ReftModel's interventions act when prompt + answer is scored: relative to the prompt.

The scorers in :mod:`reftlib.evaluation.metrics` run ``prompt + answer`` (or a left-padded prompt)
through the model. :func:`location_plan` turns each intervention's configured positions (or the
caller's ``unit_locations``) into a per-intervention plan relative to the prompt, and
:func:`batch_locations` resolves it for one batch into explicit positions for
``ReftModel.forward`` / ``generate``: ``"l1"`` is the last *prompt* token whatever follows it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from reftlib.errors import InputError, PositionError
from reftlib.model import ReftModel
from reftlib.positions import parse_position_spec, resolve_position_spec

__all__ = ["PromptLocations", "batch_locations", "expand_locations", "explicit_rows", "location_plan"]

#: Where a ReftModel's interventions act, relative to each prompt: a position spec (``"l1"``,
#: ``"f3+l3"``, ``"all"``) for every intervention; one list of prompt-token indices per prompt; or a
#: dict from intervention key (``"layer_1_block_output"`` or ``"adapter.layer_1_block_output"``) to
#: either (interventions it does not name keep their configured positions). ``None``: the configured
#: positions of every intervention.
PromptLocations = str | Sequence[Sequence[int]] | Mapping[str, str | Sequence[Sequence[int]] | None] | None

def explicit_rows(value: Any, n_prompts: int, where: str) -> list[list[int]]:
    """One list of prompt-token indices per prompt, checked (integers >= 0, no repeats)."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if not isinstance(value, Sequence) or len(value) != n_prompts:
        got = len(value) if isinstance(value, Sequence) else type(value).__name__
        raise PositionError(
            f"{where}: explicit positions must be one list of prompt-token indices per prompt "
            f"({n_prompts} prompts), got {got}."
        )
    rows: list[list[int]] = []
    for i, row in enumerate(value):
        if isinstance(row, torch.Tensor):
            row = row.tolist()
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise PositionError(f"{where}: entry {i} must be a list of prompt-token indices, got {row!r}.")
        for x in row:
            if isinstance(x, bool) or not isinstance(x, int) or x < 0:
                raise PositionError(
                    f"{where}: entry {i} holds {x!r}; positions are prompt-token indices (integers from 0)."
                )
        if len(set(row)) != len(row):
            raise PositionError(f"{where}: entry {i} lists a position twice ({list(row)}).")
        rows.append([int(x) for x in row])
    return rows


def location_plan(
    model: Any, unit_locations: PromptLocations, n_prompts: int, fn: str
) -> dict[str, str | list[list[int]]] | None:
    """Per qualified intervention key (``"adapter.key"``) of ``model``'s active adapters: a position spec
    (``"all"`` for every position) or one list of prompt-token indices per prompt.

    ``None`` when ``model`` is not a :class:`~reftlib.ReftModel` (it is then called as it is).
    """
    if not isinstance(model, ReftModel):
        if unit_locations is not None:
            raise InputError(
                f"{fn}: unit_locations place a ReftModel's interventions, but the model is a "
                f"{type(model).__name__}; pass the ReftModel itself or leave unit_locations out."
            )
        return None
    configured: dict[str, tuple[str, str | None]] = {}  # qualified key -> (plain key, configured spec)
    for name in model.active_adapters:
        for rep in model.reft_configs[name].representations:
            configured[f"{name}.{rep.name}"] = (rep.name, rep.positions)
    if isinstance(unit_locations, Mapping):
        known = set(configured) | {plain for plain, _ in configured.values()}
        unknown = [key for key in unit_locations if key not in known]
        if unknown:
            raise PositionError(
                f"{fn}: unit_locations names unknown interventions {unknown}; the active adapters have "
                f"{sorted(known)}."
            )
    plan: dict[str, str | list[list[int]]] = {}
    for key, (plain, spec) in configured.items():
        if isinstance(unit_locations, Mapping):
            value = unit_locations.get(key, unit_locations.get(plain, spec))
        elif unit_locations is None:
            value = spec
        else:
            value = unit_locations
        where = f"{fn}: unit_locations for {key!r}"
        if value is None:
            plan[key] = "all"
        elif isinstance(value, str):
            plan[key] = "all" if parse_position_spec(value) is None else value
        else:
            plan[key] = explicit_rows(value, n_prompts, where)
    return plan


def expand_locations(unit_locations: PromptLocations, repeats: Sequence[int]) -> PromptLocations:
    """Repeat per-question explicit positions once per scored choice (specs pass through)."""

    def one(value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        rows = value.tolist() if isinstance(value, torch.Tensor) else value
        if not isinstance(rows, Sequence) or len(rows) != len(repeats):
            got = len(rows) if isinstance(rows, Sequence) else type(rows).__name__
            raise PositionError(
                f"truthfulqa_mc: explicit positions must be one list of prompt-token indices per question "
                f"({len(repeats)} questions), got {got}."
            )
        return [row for row, n in zip(rows, repeats) for _ in range(n)]

    if isinstance(unit_locations, Mapping):
        return {key: one(value) for key, value in unit_locations.items()}
    return one(unit_locations)


def batch_locations(
    plan: Mapping[str, str | list[list[int]]], rows: Sequence[int], prompt_mask: torch.Tensor
) -> dict[str, str | torch.Tensor]:
    """``unit_locations`` for one padded batch, every position-restricted intervention placed on prompt
    tokens.

    Batch row ``r`` holds prompt ``rows[r]`` (its index in the call); ``prompt_mask[r]`` is 1 exactly on
    that prompt's tokens (a contiguous run, anywhere in the row: left or right padding, answer tokens
    after it). Specs are resolved against this mask; explicit positions are offset by the column of the
    prompt's first token. ``-1`` marks padding in the positions.
    """
    prompt_mask = prompt_mask.detach().to("cpu").long()
    lengths = prompt_mask.sum(dim=1).tolist()
    starts = prompt_mask.argmax(dim=1).tolist()  # the first prompt column of each row
    out: dict[str, str | torch.Tensor] = {}
    for key, value in plan.items():
        if isinstance(value, str):
            spec_positions = resolve_position_spec(value, prompt_mask)  # None for "all"
            out[key] = "all" if spec_positions is None else spec_positions
            continue
        n_max = max((len(value[k]) for k in rows), default=0)
        positions = torch.full((len(rows), n_max), -1, dtype=torch.long)
        for r, k in enumerate(rows):
            for j, p in enumerate(value[k]):
                if p >= lengths[r]:
                    raise PositionError(
                        f"unit_locations for {key!r}: position {p} of prompt {k} is past its end (the prompt "
                        f"has {lengths[r]} tokens, valid 0..{lengths[r] - 1})."
                    )
                positions[r, j] = starts[r] + p
        out[key] = positions
    return out
