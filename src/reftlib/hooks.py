"""PyTorch hooks that apply interventions at positions, and the per-call context they read.

One hook is registered per site (module + input/output), whatever the number of
interventions or adapters there. Hooks are persistent while interventions are attached and
do nothing unless the runtime is executing a call (a :class:`CallContext` around the call's
immutable :class:`~reftlib.plan.CallPlan`), so calling the base model directly always gives base
outputs. Per-call positions live in the plan, never on the model.

Applying an intervention never edits the model's own tensors in place and never moves data to
the host: positions are moved to the device once per call (from pinned memory, asynchronously,
on CUDA), padded entries (``-1``) are masked, and the edit is scattered with one ``index_put``
(accumulate) so padding can never overwrite a real position.

Cost (measured in ``benchmarks/``): a site whose interventions have nothing to do in the current
chunk (e.g. decode steps of a prompt-only intervention) returns before touching the tensor, in a
few microseconds; an edit at positions costs one gather, the intervention and one out-of-place
scatter (a copy of the ``[batch, seq, hidden]`` tensor, which autograd needs: the model may have
saved the original for its backward). Hooks are ~0.1% of a training step and ~0.02% of a decode
step on SmolLM2-135M. Backward stops at the lowest intervened site, because the frozen base model's
tensors below it do not require gradients.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .components import Site
from .errors import DeviceError, InputError, NumericalError
from .interventions import Intervention
from .plan import CallPlan


class CallContext:
    """A :class:`~reftlib.plan.CallPlan` being executed: the chunk cursor and per-device copies.

    The plan is immutable; what changes while a call runs lives here: which absolute positions
    the current forward covers (the prompt, then one chunk per decode step with a KV cache) and
    the positions and row masks already copied to each device.
    """

    __slots__ = ("_cache", "chunk_length", "chunk_start", "chunks_seen", "enabled", "next_start", "plan")

    def __init__(self, plan: CallPlan, *, enabled: bool = True) -> None:
        self.plan = plan
        self.enabled = enabled
        self.chunk_start = 0
        self.chunk_length = 0
        self.next_start = 0
        self.chunks_seen = 0
        self._cache: dict[tuple, Any] = {}

    def begin_chunk(self, length: int, has_cache: bool, cached: int | None = None) -> None:
        """Record which positions the current forward covers, relative to the plan's positions.

        ``cached`` is the number of tokens the KV cache already holds (read from the cache by the
        runtime): the forward covers ``cached .. cached + length`` of the sequence, which the plan
        indexes from ``plan.initial_offset``. Without that number, chunks are counted: the first at
        ``initial_offset``, then each after the previous one, or from 0 again without a cache (every
        step re-reads the whole sequence).
        """
        if cached is not None:
            start = cached - self.plan.initial_offset
        elif self.chunks_seen == 0 or not has_cache:
            start = 0
        else:
            start = self.next_start
        self.chunk_start, self.chunk_length, self.next_start = start, length, start + length
        self.chunks_seen += 1

    @staticmethod
    def _expand_rows(tensor: torch.Tensor, batch: int) -> torch.Tensor:
        if tensor.shape[0] == batch:
            return tensor
        # generate() expands each row for beams / num_return_sequences: [a, a, b, b, ...]
        if batch % tensor.shape[0]:
            raise InputError(f"a batch of {batch} rows cannot come from {tensor.shape[0]} input rows")
        return tensor.repeat_interleave(batch // tensor.shape[0], dim=0)

    def device_positions(
        self, key: str, device: torch.device, batch: int, start: int, length: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(row_index, position_index, valid_mask)`` on ``device`` for the chunk ``start .. start + length``.

        Positions outside the chunk (in an earlier or a later chunk of a prompt prefilled in pieces)
        are masked. ``valid_mask`` is ``None`` when every entry is a real position of this chunk
        (decided on the CPU, so without a device synchronization), which lets the edit skip masking.
        Computed once per call, key, device and chunk.
        """
        cache_key = ("pos", key, device, batch, start, length)
        hit = self._cache.get(cache_key)
        if hit is None:
            pos = self._expand_rows(self.plan.positions[key], batch)
            pos = torch.where((pos >= start) & (pos < start + length), pos - start, -1)
            valid = pos >= 0
            all_valid = bool(valid.all())  # a CPU tensor: no device synchronization
            pos = to_device(pos.clamp(min=0), device)
            rows = torch.arange(batch, device=device).unsqueeze(1).expand_as(pos)
            hit = (rows, pos, None if all_valid else to_device(valid, device))
            self._cache[cache_key] = hit
        return hit

    def row_mask(self, adapter: str, device: torch.device, batch: int) -> torch.Tensor | None:
        """Boolean ``[batch]`` mask of the rows ``adapter`` applies to (``None``: every row)."""
        mask = self.plan.row_masks.get(adapter)
        if mask is None:
            return None
        cache_key = ("rows", adapter, device, batch)
        hit = self._cache.get(cache_key)
        if hit is None:
            hit = to_device(self._expand_rows(mask, batch), device)
            self._cache[cache_key] = hit
        return hit


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small CPU tensor to ``device`` without blocking the host.

    On CUDA a copy from pageable memory waits for the stream; copying from pinned memory with
    ``non_blocking=True`` is asynchronous (the caching host allocator keeps the pinned buffer
    alive until the copy has run).
    """
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _masked(delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    while mask.dim() < delta.dim():
        mask = mask.unsqueeze(-1)
    return torch.where(mask, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))


def apply_at_positions(
    h: torch.Tensor,
    intervention: Intervention,
    rows: torch.Tensor,
    pos: torch.Tensor,
    valid: torch.Tensor | None,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Edit ``h[b, pos[b, j]]`` for every valid ``(b, j)``; everything else is left as is.

    ``valid`` (``[batch, n]`` bool) masks padded entries; ``None`` means all entries are real.
    """
    old = h[rows, pos]
    delta = intervention.delta(old)
    if row_mask is not None:
        mask = row_mask.unsqueeze(1) if valid is None else valid & row_mask.unsqueeze(1)
    else:
        mask = valid
    if mask is not None:
        delta = _masked(delta, mask)
    return torch.index_put(h, (rows, pos), delta, accumulate=True)


def apply_on_range(
    h: torch.Tensor, intervention: Intervention, start: int, end: int, row_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Edit every position in ``[start, end)`` of the sequence dimension."""
    length = h.shape[1]
    if start >= end:
        return h
    segment = h if (start == 0 and end == length) else h[:, start:end]
    delta = intervention.delta(segment)
    if row_mask is not None:
        delta = _masked(delta, row_mask)
    if segment is h:
        return h + delta
    return torch.cat([h[:, :start], segment + delta, h[:, end:]], dim=1)


class SiteHook:
    """The single hook of one site; applies every active intervention registered there.

    It reads the call being executed from ``runtime.current`` (a :class:`CallContext`, or
    ``None`` outside reftlib's calls: the hook then leaves the tensor alone).
    """

    def __init__(self, site: Site, runtime: Any) -> None:
        self.site = site
        self.runtime = runtime
        self.entries: list[tuple[str, str, Intervention]] = []  # (adapter, qualified key, intervention)
        if site.kind == "input":
            self.handle = site.module.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        else:
            self.handle = site.module.register_forward_hook(self._hook)

    def remove(self) -> None:
        self.handle.remove()

    # -- hook bodies -----------------------------------------------------------------------
    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        context = self.runtime.current
        if context is None or not context.enabled or self.runtime.disabled:
            return None
        if args:
            if not isinstance(args[0], torch.Tensor):
                return None
            edited = self.apply(args[0], context)
            return None if edited is args[0] else ((edited, *args[1:]), kwargs)
        hidden = kwargs.get("hidden_states")
        if isinstance(hidden, torch.Tensor):
            edited = self.apply(hidden, context)
            return None if edited is hidden else (args, dict(kwargs, hidden_states=edited))
        return None

    def _hook(self, module: nn.Module, args: tuple, output: Any):
        context = self.runtime.current
        if context is None or not context.enabled or self.runtime.disabled:
            return None
        if isinstance(output, torch.Tensor):
            edited = self.apply(output, context)
            return None if edited is output else edited
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            edited = self.apply(output[0], context)
            return None if edited is output[0] else (edited, *output[1:])
        return None

    # -- the edit ---------------------------------------------------------------------------
    def apply(self, hidden: torch.Tensor, context: CallContext) -> torch.Tensor:
        """Apply the plan's interventions of this site to ``hidden`` (one chunk of the call)."""
        plan = context.plan
        flat = hidden.dim() == 2  # some models (OPT's MLP) flatten [batch, seq] into one dimension
        start, prompt_length = context.chunk_start, plan.prompt_length
        chunk = context.chunk_length if flat else (hidden.shape[1] if hidden.dim() > 1 else 0)
        if not plan.check_finite and not (
            (plan.on_prompt and start < prompt_length) or (plan.on_generated and start + chunk > prompt_length)
        ):
            return hidden  # nothing to do in this chunk (e.g. a decode step of a prompt-only intervention)
        if flat:
            length = context.chunk_length
            if not length or hidden.shape[0] % length:
                return hidden
            hidden = hidden.unflatten(0, (hidden.shape[0] // length, length))
        heads = self.site.num_heads
        h = hidden.unflatten(-1, (heads, hidden.shape[-1] // heads)) if heads else hidden
        for adapter, key, intervention in self._in_stacking_order(plan.adapters):
            try:
                h = self._apply_one(h, context, adapter, key, intervention, start, prompt_length)
            except RuntimeError as exc:
                self._raise_if_misplaced(exc, h, adapter, key, intervention)
                raise
            if plan.check_finite and not bool(torch.isfinite(h).all()):
                raise NumericalError(
                    f"intervention {key!r} (adapter {adapter!r}) at {self.site.path} ({self.site.kind}) produced "
                    "NaN or inf; lower the learning rate, use dtype='float32' for the intervention, or check the inputs"
                )
        h = h.flatten(-2) if heads else h
        return h.flatten(0, 1) if flat else h

    def _in_stacking_order(self, adapters: tuple[str, ...]) -> Iterator[tuple[str, str, Intervention]]:
        """This site's entries of the call's adapters: adapters in the call's order, each in config order."""
        if len(adapters) == 1:
            yield from (entry for entry in self.entries if entry[0] == adapters[0])
            return
        for adapter in adapters:
            yield from (entry for entry in self.entries if entry[0] == adapter)

    @staticmethod
    def _apply_one(h: torch.Tensor, context: CallContext, adapter: str, key: str, intervention: Intervention,
                   start: int, prompt_length: int) -> torch.Tensor:
        plan = context.plan
        batch, length = h.shape[0], h.shape[1]
        row_mask = context.row_mask(adapter, h.device, batch)
        if plan.on_prompt and start < prompt_length:
            if plan.positions.get(key) is None:
                h = apply_on_range(h, intervention, 0, min(prompt_length - start, length), row_mask)
            else:
                rows, pos, valid = context.device_positions(key, h.device, batch, start, length)
                h = apply_at_positions(h, intervention, rows, pos, valid, row_mask)
        if plan.on_generated and start + length > prompt_length and (
            plan.generated_keys is None or key in plan.generated_keys
        ):
            h = apply_on_range(h, intervention, max(prompt_length - start, 0), length, row_mask)
        return h

    def _raise_if_misplaced(self, exc: RuntimeError, h: torch.Tensor, adapter: str, key: str,
                            intervention: Intervention) -> None:
        """Turn torch's device error into one that names the intervention, its layer and the fix."""
        devices = {p.device for p in intervention.parameters()} | {b.device for b in intervention.buffers()}
        wrong = sorted(str(d) for d in devices if d != h.device)
        if wrong:
            local = key[len(adapter) + 1:] if key.startswith(adapter + ".") else key
            raise DeviceError(
                f"intervention {key!r} (adapter {adapter!r}) is on {', '.join(wrong)} but {self.site.path} computes "
                f"on {h.device}; move it next to its layer: reft_model.adapters[{adapter!r}][{local!r}].to({str(h.device)!r}) "
                "(reft_model.set_device(device) moves the model and every intervention together)"
            ) from exc
