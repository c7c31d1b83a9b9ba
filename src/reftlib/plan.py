"""The call plan: what one forward (or one ``generate``) call asks of the interventions.

A :class:`CallPlan` is built once per call from the adapter registry and the call's arguments
and never changes afterwards. It says, for the rows of one batch:

* which adapters act, in which stacking order, and on which rows (``row_masks``);
* where each intervention acts (``positions``, per qualified key ``"adapter.key"``): a CPU
  ``[batch, n]`` tensor of token indices (``-1`` = padding) or ``None`` for every position;
* whether it acts on prompt positions, on generated positions, or both (generation modes).

Runtimes execute plans: the Hugging Face runtime (:mod:`reftlib.runtime`) with module hooks over
padded ``[batch, seq]`` tensors, and any runtime over a flat token batch (continuous batching),
through :meth:`CallPlan.flat_positions`. Building a plan needs only the attention mask (or the
per-row prompt lengths, :func:`mask_from_lengths`), never the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from .errors import AdapterError, InputError, PositionError
from .positions import as_position_tensor, normalize_unit_locations, validate_positions

#: ``adapter name -> [(intervention key, configured position spec or None), ...]`` in config order:
#: what a plan needs to know about the adapters of a model.
AdapterSpecs = Mapping[str, Sequence[tuple[str, "str | None"]]]

#: Generation modes: ``mode -> (acts on prompt positions, acts on generated positions)``.
GENERATION_MODES: Mapping[str, tuple[bool, bool]] = MappingProxyType({
    "auto": (True, True),  # generated tokens: only interventions whose positions are "every position"
    "prompt": (True, False),
    "generated": (False, True),
    "prompt+generated": (True, True),
    "all": (True, True),
})


@dataclass(frozen=True)
class CallPlan:
    """One call's interventions, resolved: immutable, built once, read by a runtime.

    ``positions[key]`` index the sequence of the call's inputs (the prompt, for generation);
    ``prompt_length`` separates prompt positions (edited at ``positions`` when ``on_prompt``)
    from generated ones (edited at every position when ``on_generated``, by the keys in
    ``generated_keys`` only when that is given). ``initial_offset`` is the absolute position of
    the call's first input token (tokens already in a KV cache).
    """

    positions: Mapping[str, torch.Tensor | None]
    batch_size: int
    prompt_length: int
    adapters: tuple[str, ...]
    row_masks: Mapping[str, torch.Tensor] = field(default_factory=dict)
    on_prompt: bool = True
    on_generated: bool = False
    generated_keys: frozenset[str] | None = None
    check_finite: bool = False
    initial_offset: int = 0

    def keys_of(self, adapter: str) -> list[str]:
        """The qualified keys of ``adapter`` in this plan, in config order."""
        prefix = adapter + "."
        return [key for key in self.positions if key.startswith(prefix)]

    def flat_positions(self, key: str, row_starts: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Indices into a flat token batch (rows concatenated) where ``key`` acts on the prompt.

        ``row_starts[b]`` is where row ``b``'s first token sits in the flat batch (rows are
        unpadded there, so positions must index each row's real tokens from 0: build the plan
        with a right-padded mask, e.g. :func:`mask_from_lengths`). ``None`` positions (every
        position) have no index list: a flat runtime edits the whole row range instead.
        """
        pos = self.positions[key]
        if pos is None:
            raise PositionError(f"{key!r} acts on every position; edit each row's whole token range instead")
        starts = torch.as_tensor(row_starts, dtype=torch.long).reshape(-1, 1)
        if starts.shape[0] != pos.shape[0]:
            raise InputError(f"row_starts has {starts.shape[0]} rows but the plan has {pos.shape[0]}")
        flat = pos + starts
        keep = pos >= 0
        mask = self.row_masks.get(key.split(".", 1)[0])
        if mask is not None:
            keep &= mask.reshape(-1, 1)
        return flat[keep]


def mask_from_lengths(lengths: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """A right-padded ``[batch, max_length]`` attention mask for rows of the given lengths."""
    lengths = torch.as_tensor(lengths, dtype=torch.long).reshape(-1)
    if lengths.numel() == 0 or bool((lengths < 1).any()):
        raise InputError(f"every row needs at least one token, got lengths {lengths.tolist()}")
    width = int(lengths.max())
    return (torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)).long()


def build_plan(
    specs: AdapterSpecs,
    active: Sequence[str],
    attention_mask: torch.Tensor,
    *,
    unit_locations: Any = None,
    intervention_locations: torch.Tensor | None = None,
    adapter_names: Sequence[str | Sequence[str] | None] | None = None,
    mode: str | None = None,
    check_finite: bool = False,
    initial_offset: int = 0,
) -> CallPlan:
    """Resolve one call's adapters (per row) and positions into a :class:`CallPlan`.

    ``specs`` describes every adapter of the model (see :data:`AdapterSpecs`); ``active`` are
    the adapters acting on every row unless ``adapter_names`` (one entry per row: a name, ``None``
    for the base model, or a list stacked in that order) mixes them per row. ``mode`` is ``None``
    for a forward pass, or a :data:`GENERATION_MODES` name.

    Positions come from ``intervention_locations`` (``[batch, n_interventions, n]``, reftlib's
    collators: taken as they are, one slice per intervention in stacking order) or from
    ``unit_locations`` (every form :func:`reftlib.positions.normalize_unit_locations` accepts).
    A dict ``unit_locations`` may name an intervention by its qualified key (``"a.layer_1_block_output"``:
    that adapter only) or by its plain key (every adapter of the call that has it); a qualified
    entry wins over a plain one. Integer dict keys and the per-intervention list form index the
    interventions in stacking order (adapters in call order, then each adapter's config order).
    """
    batch = attention_mask.shape[0]
    if batch == 0:
        raise InputError("the batch is empty (0 rows); pass at least one example")
    if mode is not None and mode not in GENERATION_MODES:
        raise InputError(f"unknown generation mode {mode!r}; use one of {list(GENERATION_MODES)}")
    if adapter_names is None:
        order, row_masks = list(active), {}
    else:
        order, row_masks = rows_of_adapters(specs, adapter_names, batch)
    keys = [f"{name}.{key}" for name in order for key, _ in specs[name]]
    defaults = {f"{name}.{key}": spec for name in order for key, spec in specs[name]}
    if mode == "all":
        positions: dict[str, torch.Tensor | None] = dict.fromkeys(keys)
    elif intervention_locations is not None:
        if unit_locations is not None:
            raise PositionError("give unit_locations or intervention_locations, not both")
        positions = _from_collator(intervention_locations, keys, attention_mask)
    else:
        locations = qualify_locations(specs, unit_locations, order)
        positions = normalize_unit_locations(locations, keys, defaults, attention_mask)
    on_prompt, on_generated = GENERATION_MODES[mode] if mode is not None else (True, False)
    generated_keys = None
    if mode == "auto":  # generated tokens: the interventions that act on every position
        generated_keys = frozenset(key for key, pos in positions.items() if pos is None)
        on_generated = bool(generated_keys)
    return CallPlan(
        positions=MappingProxyType(positions),
        batch_size=batch,
        prompt_length=attention_mask.shape[1],
        adapters=tuple(order),
        row_masks=MappingProxyType(row_masks),
        on_prompt=on_prompt,
        on_generated=on_generated,
        generated_keys=generated_keys,
        check_finite=check_finite,
        initial_offset=initial_offset,
    )


def _from_collator(locations: Any, keys: Sequence[str], attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split a collator's ``[batch, n_interventions, n]`` tensor per intervention (no dict round trip)."""
    if not isinstance(locations, torch.Tensor) or locations.dim() != 3:
        shape = tuple(locations.shape) if isinstance(locations, torch.Tensor) else type(locations).__name__
        raise PositionError(f"intervention_locations must be a [batch, n_interventions, n_positions] tensor, got {shape}")
    if locations.shape[1] != len(keys):
        raise PositionError(
            f"intervention_locations gives positions for {locations.shape[1]} intervention(s) but the call has "
            f"{len(keys)} ({list(keys)}); expected shape [batch, n_interventions, n_positions]"
        )
    batch, length = attention_mask.shape
    tensor = as_position_tensor(locations.flatten(1, 2), "intervention_locations").view_as(locations)
    return {
        key: validate_positions(tensor[:, i], batch, length, f"intervention_locations for {key!r}")
        for i, key in enumerate(keys)
    }


def split_adapters(entry: str | Sequence[str] | None) -> list[Any]:
    """One row's ``adapter_names`` entry as a list of names (``None``: no adapter, the base model)."""
    if entry is None:
        return []
    if isinstance(entry, str) or not isinstance(entry, Sequence):
        return [entry]
    return list(entry)


def rows_of_adapters(
    specs: AdapterSpecs, adapter_names: Sequence[str | Sequence[str] | None], batch: int
) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Stacking order of the adapters used by a mixed batch and each one's boolean row mask.

    Each row names an adapter, ``None`` (base model) or a list of adapters applied in that
    order. The call's order merges every row's order (first appearance breaks ties); rows
    that stack the same adapters in opposite orders are rejected. Adapters used by every row
    get no mask.
    """
    if isinstance(adapter_names, (str, bytes)) or not isinstance(adapter_names, Sequence) \
            or len(adapter_names) != batch:
        raise AdapterError(
            f"adapter_names must be a list with one entry per row ({batch} rows): an adapter name, None "
            f"(base model) or a list of names (stacked in that order); got {adapter_names!r}"
        )
    stacks = []
    for i, entry in enumerate(adapter_names):
        stack = split_adapters(entry)
        for name in stack:
            if not isinstance(name, str) or name not in specs:
                raise AdapterError(f"unknown adapter {name!r}; this model has adapters {list(specs)}")
        if len(set(stack)) != len(stack):
            raise AdapterError(f"adapter_names[{i}] = {entry!r} names an adapter twice")
        stacks.append(stack)
    used = list(dict.fromkeys(name for stack in stacks for name in stack))
    after: dict[str, set[str]] = {name: set() for name in used}  # after[a]: adapters some row applies after a
    for stack in stacks:
        for i, name in enumerate(stack):
            after[name].update(stack[i + 1:])
    order: list[str] = []
    pending = list(used)
    while pending:
        ready = next((a for a in pending if not any(a in after[b] for b in pending if b != a)), None)
        if ready is None:
            raise AdapterError(
                f"rows of adapter_names stack adapters {pending} in conflicting orders; one call needs "
                "one stacking order (split the batch, or list them in the same order on every row)"
            )
        order.append(ready)
        pending.remove(ready)
    row_masks = {}
    for name in order:
        mask = torch.tensor([name in stack for stack in stacks])
        if not bool(mask.all()):
            row_masks[name] = mask
    return order, row_masks


def qualify_locations(specs: AdapterSpecs, unit_locations: Any, order: Sequence[str]) -> Any:
    """Rewrite a dict of positions keyed by plain intervention keys into qualified keys.

    Entries for adapters of the model that this call does not use are ignored, so one dict
    can serve every call; keys that no adapter has are an error.
    """
    if not isinstance(unit_locations, Mapping) or "sources->base" in unit_locations or "base" in unit_locations:
        return unit_locations
    owners: dict[str, list[str]] = {}
    for name in order:
        for key, _ in specs[name]:
            owners.setdefault(key, []).append(f"{name}.{key}")
    qualified_keys = {q for names in owners.values() for q in names}
    known = {f"{name}.{key}" for name, entries in specs.items() for key, _ in entries}
    known |= {q.split(".", 1)[1] for q in known}
    plain: dict[Any, Any] = {}
    exact: dict[Any, Any] = {}
    for key, value in unit_locations.items():
        if isinstance(key, str) and key in owners:
            plain.update(dict.fromkeys(owners[key], value))
        elif isinstance(key, int) or key in qualified_keys:
            exact[key] = value
        elif key not in known:
            raise PositionError(
                f"unit_locations names unknown intervention {key!r}; the adapters of this call "
                f"({list(order)}) have keys {sorted(owners)}, also accepted qualified as {sorted(qualified_keys)}"
            )
    return {**plain, **exact}
