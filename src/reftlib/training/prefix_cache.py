"""Skip the frozen layers below the lowest intervention on examples the trainer has already seen.

Below the lowest intervened layer nothing trains: the base model's weights are frozen and no
intervention acts there, so the hidden states entering that layer are a fixed function of each
example. ReFT training makes many passes over few examples (pyreft's emoji tutorial: 100 epochs
over 10), so :class:`PrefixCache` records those hidden states the first time an example is
trained on and, on every later step whose examples were all recorded, runs the layers from the
boundary up only. With an intervention at the middle layer this removes half of the forward pass,
about a quarter of a training step; loss and gradients are the same (up to floating-point
reassociation: a cached row was computed in another batch).

What makes a step cacheable, checked rather than assumed:

* **The boundary.** ``B`` = the lowest layer holding an active intervention; layers ``0..B-1`` are
  skipped, and layer ``B`` too when every intervention there acts on its output (the hook still
  runs on the replayed output). Interventions outside the layer list (a module-path component)
  turn the cache off.
* **A frozen, deterministic prefix.** A recording step checks that no module that ran before the
  boundary has trainable parameters (e.g. LoRA on lower layers) and that the prefix drew no
  random numbers (dropout, router jitter: the RNG state is compared before and after). Either
  turns the cache off for the rest of training (``prefix_cache=True`` raises instead).
* **Inputs it understands.** ``input_ids`` with a 2-D ``attention_mask`` whose real tokens are one
  contiguous run per row, optional ``position_ids``/``token_type_ids``, the labels and the
  positions; any other input (``inputs_embeds``, pixel values, ``output_hidden_states``...) makes
  the step run normally. A row's key is its real tokens and where they start, so right-padded
  examples hit whatever the batch's padded length; padded positions are replayed as zeros (the
  attention mask hides them from real tokens and the losses ignore them).
* **A layer output it can rebuild.** A tensor ``[batch, seq, hidden]`` or a tuple whose other
  entries are ``None``; anything else (T5's position bias, a cache object) turns the cache off.

Skipping is done by pointing the skipped layers' ``forward`` at the recorded output for the
duration of one training step and restoring it (including a ``forward`` that another library,
e.g. accelerate, had installed on the instance) afterwards, also when the step fails. The rows
live on the CPU (copied to the device once per step); recording stops at ``max_bytes``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ..components import find_layers
from ..errors import PrefixUnavailable, ReftConfigError

__all__ = ["PrefixCache"]

logger = logging.getLogger(__name__)

#: Inputs a cacheable step may carry besides ``input_ids``/``attention_mask``: per-token inputs that
#: feed the prefix (part of the row key) and inputs the prefix never reads.
_PER_TOKEN_INPUTS = ("position_ids", "token_type_ids")
_PREFIX_INDEPENDENT = ("labels", "intervention_locations", "logits_to_keep", "subspaces")
_MISSING = object()


class PrefixCache:
    """Hidden states at the input of the first trained layer, per example, reused across epochs.

    ``required=False`` (the trainers' ``prefix_cache="auto"``): when the model or its layer outputs
    cannot be cached, log why once and train normally. ``required=True``: raise a
    :class:`~reftlib.errors.ReftConfigError` naming the reason instead.
    """

    def __init__(self, *, max_bytes: int = 2**30, required: bool = False) -> None:
        self.max_bytes = int(max_bytes)
        self.required = required
        self.reset()

    def reset(self) -> None:
        """Forget every recorded row (the base model may have changed) and re-enable the cache."""
        self.rows: dict[tuple, torch.Tensor] = {}
        self.bytes = 0
        self.hits = 0  # steps that skipped the prefix
        self.misses = 0  # steps that ran it (and recorded their rows)
        self.bypassed = 0  # steps whose inputs the cache does not handle
        self.disabled: str | None = None
        self._context: tuple | None = None  # (boundary, autocast state, output template) the rows belong to
        self._checked: set[int] = set()  # boundaries whose prefix modules passed the static checks
        self._full_logged = False
        self._layers: tuple[nn.Module, nn.ModuleList] | None = None  # (base model, its layer list)

    # ------------------------------------------------------------------ the step
    @contextlib.contextmanager
    def step(self, reft_model: nn.Module, inputs: Mapping[str, Any]) -> Iterator[None]:
        """Run one training step (forward and backward) inside this context."""
        plan = None if self.disabled else self._plan(reft_model, inputs)
        if plan is None:
            if not self.disabled:
                self.bypassed += 1
            yield
            return
        layers, boundary, keys, spans, context = plan
        if self._context is not None and self._context[:2] != context:
            self._forget()
        if self._context is not None and all(key in self.rows for key in keys):
            self.hits += 1
            with _skipping(layers[:boundary], self._replay(keys, spans, inputs)):
                yield
            return
        self.misses += 1
        with self._recording(reft_model, layers, boundary, keys, spans, context, inputs["input_ids"].shape[1]):
            yield

    # ------------------------------------------------------------------ planning
    def _plan(self, reft_model: nn.Module, inputs: Mapping[str, Any]):
        try:
            layers, boundary = self._boundary(reft_model)
        except PrefixUnavailable as reason:
            self._disable(str(reason))
            return None
        if boundary == 0:
            return None
        keyed = _row_keys(inputs)
        if keyed is None:
            return None
        keys, spans = keyed
        return layers, boundary, keys, spans, (boundary, _autocast_state())

    def _boundary(self, reft_model: nn.Module) -> tuple[nn.ModuleList, int]:
        """The layer list and how many of its layers can be skipped (0: none)."""
        if getattr(reft_model.config, "output_router_logits", False):
            raise PrefixUnavailable("the model returns router logits of every layer (output_router_logits=True)")
        if self._layers is None or self._layers[0] is not reft_model.model:
            self._layers = (reft_model.model, find_layers(reft_model.model)[1])
        layers = self._layers[1]
        index = {id(layer): i for i, layer in enumerate(layers)}
        active = set(reft_model.active_adapters)
        lowest, output_only = None, True
        for site in reft_model.runtime.sites_of(active):
            if site.layer is None:
                raise PrefixUnavailable(f"an intervention sits outside the layer list ({site.path})")
            on_output = site.kind == "output" and index.get(id(site.module)) == site.layer
            if lowest is None or site.layer < lowest:
                lowest, output_only = site.layer, on_output
            elif site.layer == lowest:
                output_only = output_only and on_output
        if lowest is None:
            return layers, 0
        return layers, lowest + 1 if output_only else lowest

    # ------------------------------------------------------------------ replaying
    def _replay(self, keys: list[tuple], spans: list[tuple[int, int]], inputs: Mapping[str, Any]) -> Any:
        _, _, (dtype, device, width, requires_grad, tail) = self._context
        batch, length = inputs["input_ids"].shape
        hidden = torch.zeros(batch, length, width, dtype=dtype)
        for row, (key, (start, end)) in enumerate(zip(keys, spans)):
            hidden[row, start:end] = self.rows[key]
        hidden = hidden.to(device, non_blocking=device.type == "cuda")
        if requires_grad:  # checkpointing with input gradients: the recorded output required them too
            hidden.requires_grad_(True)
        return hidden if tail is None else (hidden, *tail)

    # ------------------------------------------------------------------ recording
    @contextlib.contextmanager
    def _recording(self, reft_model, layers, boundary, keys, spans, context, length: int) -> Iterator[None]:
        last = layers[boundary - 1]
        rng_before = _rng_states()
        captured: dict[str, Any] = {}
        order = self._call_order(reft_model, boundary, last)

        def capture(module, args, output):
            captured["output"] = output
            captured["rng_changed"] = not _same_rng(rng_before, _rng_states())

        handle = last.register_forward_hook(capture, prepend=True)  # before the interventions edit it
        try:
            with order:
                yield
        finally:
            handle.remove()
        if "output" not in captured:
            return  # the step failed before the boundary, or an earlier failure is propagating
        try:
            self._check_prefix(reft_model, layers, boundary, order)
            if captured["rng_changed"]:
                raise PrefixUnavailable("the layers below the interventions draw random numbers in training "
                                        "(dropout or router noise)")
            template = _template(captured["output"], keys, length)
        except PrefixUnavailable as reason:
            self._disable(str(reason))
            return
        if self._context is None or self._context[2] != template[0]:
            self._forget()
            self._context = (*context, template[0])
        self._store(template[1], keys, spans)

    def _call_order(self, reft_model, boundary: int, last: nn.Module):
        """Note which modules outside the layer list run before the boundary (first recording only)."""
        if boundary in self._checked:
            return contextlib.nullcontext(set())
        return _ModulesCalledBefore(reft_model.model, last)

    def _check_prefix(self, reft_model, layers, boundary: int, order) -> None:
        """No module that runs before the boundary may train."""
        if boundary in self._checked:
            return
        modules = [*layers[:boundary], *order.called]
        for module in modules:
            recurse = any(module is layer for layer in layers[:boundary])
            for name, param in module.named_parameters(recurse=recurse):
                if param.requires_grad:
                    raise PrefixUnavailable(
                        f"a parameter below the interventions trains ({type(module).__name__}.{name}); the layers "
                        "before the first intervention must be frozen"
                    )
        self._checked.add(boundary)

    def _store(self, hidden: torch.Tensor, keys: list[tuple], spans: list[tuple[int, int]]) -> None:
        rows = hidden.detach().to("cpu")
        for row, (key, (start, end)) in enumerate(zip(keys, spans)):
            if key in self.rows:
                continue
            size = (end - start) * rows.shape[-1] * rows.element_size()
            if self.bytes + size > self.max_bytes:
                if not self._full_logged:
                    logger.info("prefix cache full (%.0f MiB); later examples run the whole model",
                                self.bytes / 2**20)
                    self._full_logged = True
                return
            self.rows[key] = rows[row, start:end].clone()
            self.bytes += size

    # ------------------------------------------------------------------ state
    def _forget(self) -> None:
        self.rows.clear()
        self.bytes = 0
        self._context = None

    def _disable(self, reason: str) -> None:
        if self.required:
            raise ReftConfigError(f"prefix_cache=True, but {reason}; pass prefix_cache='auto' or False to train "
                                  "without skipping the frozen layers")
        if self.disabled is None:
            logger.info("reftlib: not caching the frozen layers below the interventions: %s", reason)
        self.disabled = reason
        self._forget()

    def __repr__(self) -> str:
        state = f"disabled: {self.disabled}" if self.disabled else f"{len(self.rows)} rows, {self.bytes / 2**20:.1f} MiB"
        return f"PrefixCache({state}; {self.hits} hits, {self.misses} misses, {self.bypassed} bypassed)"


# ---------------------------------------------------------------------- helpers
def _row_keys(inputs: Mapping[str, Any]) -> tuple[list[tuple], list[tuple[int, int]]] | None:
    """One key per row (where its real tokens start, and their ids and per-token inputs), or ``None``."""
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return None
    for name, value in inputs.items():
        if name in ("input_ids", "attention_mask", *_PER_TOKEN_INPUTS, *_PREFIX_INDEPENDENT):
            continue
        if value is None or value is False:
            continue
        return None  # an input the prefix may read (inputs_embeds, output_hidden_states=True, ...)
    batch, length = ids.shape
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.bool)
    elif not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        return None  # 4-D or packed masks
    mask = mask.to("cpu").bool()
    per_token = []
    for name in _PER_TOKEN_INPUTS:
        value = inputs.get(name)
        if isinstance(value, torch.Tensor):
            if value.shape != ids.shape:
                return None
            per_token.append(value.to("cpu"))
    ids = ids.to("cpu")
    counts = mask.sum(dim=1)
    starts = mask.int().argmax(dim=1)
    keys, spans = [], []
    for row in range(batch):
        start, count = int(starts[row]), int(counts[row])
        if count == 0 or not bool(mask[row, start:start + count].all()):
            return None  # an empty row or real tokens in more than one run
        end = start + count
        key = (start, ids[row, start:end].numpy().tobytes(), *(t[row, start:end].numpy().tobytes() for t in per_token))
        keys.append(key)
        spans.append((start, end))
    return keys, spans


def _template(output: Any, keys: list[tuple], length: int) -> tuple[tuple, torch.Tensor]:
    """``((dtype, device, width, requires_grad, tail), hidden)`` for a layer output, if it can be rebuilt."""
    tail = None
    hidden = output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        if any(item is not None for item in output[1:]):
            raise PrefixUnavailable("the layers return more than hidden states (e.g. a position bias or a cache)")
        hidden, tail = output[0], tuple(output[1:])
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or tuple(hidden.shape[:2]) != (len(keys), length):
        raise PrefixUnavailable(f"a layer output of type {type(output).__name__} is not [batch, seq, hidden] for "
                                f"the batch's {len(keys)} x {length} input ids")
    return (hidden.dtype, hidden.device, hidden.shape[-1], hidden.requires_grad, tail), hidden


@contextlib.contextmanager
def _skipping(layers: list[nn.Module] | nn.ModuleList, output: Any) -> Iterator[None]:
    """Make ``layers`` return ``output`` without computing; their hooks still run. Restored on exit."""

    def replay(*args: Any, **kwargs: Any) -> Any:
        return output

    saved = [layer.__dict__.get("forward", _MISSING) for layer in layers]
    try:
        for layer in layers:
            layer.forward = replay
        yield
    finally:
        for layer, previous in zip(layers, saved):
            if previous is _MISSING:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = previous


class _ModulesCalledBefore(contextlib.AbstractContextManager):
    """Collects the modules outside the layer list that run before ``last`` returns (embeddings, rotary, ...)."""

    def __init__(self, model: nn.Module, last: nn.Module) -> None:
        self.model, self.last = model, last
        self.called: list[nn.Module] = []
        self._done = False
        self._handles: list[Any] = []

    def __enter__(self):
        _, layers = find_layers(self.model)
        inside = {id(m) for layer in layers for m in layer.modules()}

        def pre(module, args):
            if not self._done:
                self.called.append(module)

        def done(module, args, output):
            self._done = True

        for module in self.model.modules():
            if id(module) not in inside:
                self._handles.append(module.register_forward_pre_hook(pre))
        self._handles.append(self.last.register_forward_hook(done))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()


def _rng_states() -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.extend(torch.cuda.get_rng_state_all())
    return states


def _same_rng(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _autocast_state() -> tuple:
    kinds = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    return tuple((kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) for kind in kinds)
