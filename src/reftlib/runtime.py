"""The Hugging Face runtime: executes call plans on a ``transformers`` model through module hooks.

:class:`HFRuntime` owns everything that is specific to running on a (possibly PEFT-wrapped)
Hugging Face model in one process:

* the site hooks (one :class:`~reftlib.hooks.SiteHook` per module and input/output), which read
  the call being executed from :attr:`HFRuntime.current`;
* KV-cache and chunk tracking: a pre-hook on the innermost model notes which absolute positions
  each forward covers (the prompt, then one token per decode step);
* activation-checkpoint recomputation: the recomputed layers run under the context of the call
  that ran them (:meth:`HFRuntime.checkpoint_contexts`, torch's ``context_fn``);
* probing a model once to learn each site's tensor shape and device.

``ReftModel`` keeps the adapter registry and the public API; it builds a
:class:`~reftlib.plan.CallPlan` per call and runs the base model inside :meth:`HFRuntime.run`.
Other runtimes (e.g. a serving engine's flat token batches) execute the same plans with the same
intervention modules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .components import Site
from .errors import ArchitectureError, ReftConfigError
from .hooks import CallContext, SiteHook
from .interventions import Intervention
from .plan import CallPlan


def innermost_model(model: nn.Module) -> nn.Module:
    """The model under PEFT wrappers (``PeftModel.get_base_model()``), else ``model`` itself.

    ``PeftModel.generate`` calls the wrapped model's ``generate``, which calls that model's forward
    at each step: a hook on the wrapper would see only direct forward calls, never decoding steps.
    """
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model):
        inner = get_base_model()
        if isinstance(inner, nn.Module) and inner is not model:
            return inner
    return model


def is_checkpointing(model: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on for ``model`` (any ``transformers`` version)."""
    flag = getattr(type(model), "is_activation_checkpointing", None)
    if flag is not None:
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def cached_length(cache: Any) -> int | None:
    """How many tokens a KV cache holds (what ``generate`` itself reads), or ``None`` when unknown."""
    if cache is None:
        return 0
    get_seq_length = getattr(cache, "get_seq_length", None)
    if callable(get_seq_length):
        return int(get_seq_length())
    if isinstance(cache, (tuple, list)):  # the legacy format: per layer (key, value) of [batch, heads, seq, dim]
        if not cache:
            return 0
        first = cache[0]
        key = first[0] if isinstance(first, (tuple, list)) and first else None
        if isinstance(key, torch.Tensor) and key.dim() >= 2:
            return int(key.shape[-2])
    return None


class HFRuntime:
    """Runs :class:`~reftlib.plan.CallPlan` s on one Hugging Face model through hooks."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.hooks: dict[tuple[str, str], SiteHook] = {}
        #: The call being executed (``None`` outside reftlib's calls: hooks do nothing).
        self.current: CallContext | None = None
        self.in_call = False
        self.disabled = False
        # On the innermost model: PEFT wrappers run generate() on the model they wrap, never through their forward.
        self._tracker = innermost_model(model).register_forward_pre_hook(self._track_chunk, with_kwargs=True)

    # ------------------------------------------------------------------ sites
    def add(self, site: Site, adapter: str, key: str, intervention: Intervention) -> None:
        """Apply ``intervention`` at ``site`` for ``adapter`` (``key`` is its qualified key ``"adapter.name"``)."""
        hook = self.hooks.get(site.key)
        if hook is None:
            hook = self.hooks[site.key] = SiteHook(site, self)
        hook.entries.append((adapter, key, intervention))

    def remove_adapter(self, adapter: str) -> None:
        """Forget ``adapter``'s interventions; sites left empty lose their hook."""
        for site_key, hook in list(self.hooks.items()):
            hook.entries = [entry for entry in hook.entries if entry[0] != adapter]
            if not hook.entries:
                hook.remove()
                del self.hooks[site_key]

    def sites_of(self, adapters: Iterable[str]) -> list[Site]:
        """The sites where any of ``adapters`` acts."""
        wanted = set(adapters)
        return [hook.site for hook in self.hooks.values() if any(entry[0] in wanted for entry in hook.entries)]

    def remove(self) -> None:
        """Remove every hook this runtime installed (the model is then exactly the base model)."""
        for hook in self.hooks.values():
            hook.remove()
        self.hooks.clear()
        self._tracker.remove()
        self.current = None

    # ------------------------------------------------------------------ calls
    @contextlib.contextmanager
    def run(self, plan: CallPlan) -> Iterator[CallContext]:
        """Execute ``plan`` for the base-model calls made inside this context."""
        context = CallContext(plan, enabled=not self.disabled)
        previous = (self.current, self.in_call)
        self.current, self.in_call = context, True
        try:
            yield context
        finally:
            if previous[1]:  # a nested call: back to the outer call's context
                self.current = previous[0]
            elif (torch.is_grad_enabled() and self.model.training and is_checkpointing(innermost_model(self.model))
                  and not self.checkpoint_context_installed()):
                # Checkpointing enabled on the base model directly (no context_fn): backward re-runs
                # the hooked layers after the call returned, so the last grad call's context stays
                # until the next call. One forward per backward is then required.
                self.current = context
            else:  # keep a context retained for checkpointing across no-grad calls (a DPO reference pass)
                self.current = previous[0]
            self.in_call = previous[1]

    @contextlib.contextmanager
    def interventions_disabled(self) -> Iterator[None]:
        """Calls started inside this context run the base model (their hooks do nothing)."""
        previous = self.disabled
        self.disabled = True
        try:
            yield
        finally:
            self.disabled = previous

    def begin_forward(self, inputs: Mapping[str, Any]) -> None:
        """Note the chunk a base-model forward covers; for forwards that bypass the innermost model's hook.

        (E.g. a classification model that runs its backbone without the task head.)
        """
        self._track_chunk(None, (), dict(inputs))

    def _track_chunk(self, module: nn.Module | None, args: tuple, kwargs: dict) -> None:
        context = self.current
        if context is None:
            return
        if not self.in_call:
            self.current = None  # stale context kept for gradient checkpointing: the base model is called directly
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            return
        # transformers ≥ 5.25 names the KV cache argument ``cache`` (``past_key_values`` before).
        cache = kwargs.get("cache")
        if cache is None:
            cache = kwargs.get("past_key_values")
        context.begin_chunk(ids.shape[1], cache is not None, cached_length(cache))

    # ------------------------------------------------------------------ checkpointing
    def checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """``context_fn`` of torch's checkpoint: the recomputation runs with the context of the call that ran forward."""
        return contextlib.nullcontext(), self._replaying(self.current)

    @contextlib.contextmanager
    def _replaying(self, context: CallContext | None) -> Iterator[None]:
        previous = (self.current, self.in_call)
        self.current, self.in_call = context, context is not None
        try:
            yield
        finally:
            self.current, self.in_call = previous

    def checkpoint_context_installed(self) -> bool:
        """Whether the base model's checkpointing carries :meth:`checkpoint_contexts` (set by reftlib)."""
        for module in innermost_model(self.model).modules():
            func = getattr(module, "_gradient_checkpointing_func", None)
            if func is not None:
                keywords = getattr(func, "keywords", None) or {}
                return getattr(keywords.get("context_fn"), "__self__", None) is self
        return False

    # ------------------------------------------------------------------ probing
    def probe(self, sites: list[Site]) -> dict[tuple[str, str], tuple[torch.Size, torch.device]]:
        """Run a two-token forward once to learn each site's tensor shape and device."""
        found: dict[tuple[str, str], tuple[torch.Size, torch.device]] = {}
        handles = []

        def record(site: Site):
            def pre(module, args, kwargs):
                tensor = args[0] if args else kwargs.get("hidden_states")
                if isinstance(tensor, torch.Tensor):
                    found.setdefault(site.key, (tensor.shape, tensor.device))

            def post(module, args, output):
                tensor = output if isinstance(output, torch.Tensor) else (output[0] if isinstance(output, tuple) else None)
                if isinstance(tensor, torch.Tensor):
                    found.setdefault(site.key, (tensor.shape, tensor.device))

            return pre, post

        for site in {s.key: s for s in sites}.values():
            pre, post = record(site)
            if site.kind == "input":
                handles.append(site.module.register_forward_pre_hook(pre, with_kwargs=True))
            else:
                handles.append(site.module.register_forward_hook(post))
        if any(hasattr(p, "ds_id") and p.numel() == 0 for p in self.model.parameters()):
            raise ReftConfigError(
                "the model's weights are partitioned by DeepSpeed ZeRO-3 (it was loaded while a ZeRO-3 config was "
                "active, e.g. after TrainingArguments(deepspeed=...)), and reftlib runs the model once to find the "
                "shapes at its sites; load the model and build the ReftModel before the DeepSpeed config exists "
                "(DeepSpeed partitions the weights when training starts)"
            )
        device = self.input_device()
        try:
            with torch.no_grad(), self.base_only():
                ids = torch.tensor([[1, 2]], device=device)
                self.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        except Exception as exc:
            raise ArchitectureError(
                f"reftlib runs a 2-token forward to find the shapes at each site, and {type(self.model).__name__} "
                f"failed on it: {exc}. Models that need more than input_ids (e.g. encoder-decoder) are not supported"
            ) from exc
        finally:
            for handle in handles:
                handle.remove()
        for site in sites:
            if site.key not in found:
                raise ArchitectureError(
                    f"site {site.path} ({site.kind}) for component {site.component!r} never received a tensor "
                    "during a forward pass; choose another component or module path"
                )
        return found

    @contextlib.contextmanager
    def base_only(self) -> Iterator[None]:
        """Run the model with no call context (e.g. to measure shapes); hooks do nothing inside."""
        current, self.current = self.current, None
        try:
            yield
        finally:
            self.current = current

    def input_device(self) -> torch.device:
        """Where the model's input embeddings live (the device inputs go to)."""
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        weight = getattr(embeddings, "weight", None)
        if weight is not None and weight.device.type == "meta":
            raise ArchitectureError("the model's weights are on the 'meta' device; load real weights before attaching")
        return weight.device if weight is not None else next(self.model.parameters()).device

