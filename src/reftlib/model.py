"""``ReftModel``: a Hugging Face model with interventions attached through hooks.

The base model's code and weights are never edited. Interventions are registered
submodules (``reft_model.adapters[name][key]``), so ``parameters()``, ``state_dict()``,
``.to()``, optimizers and DDP see them. Several named adapters can be attached; any subset is
active, and a batch can mix adapters per row.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .components import Site, resolve_site, text_config
from .config import ReftConfig, RepresentationConfig
from .errors import AdapterError, ArchitectureError, InputError, PositionError, ReftConfigError
from .hooks import CallState, SiteHook
from .interventions import Intervention
from .positions import normalize_unit_locations

DEFAULT_ADAPTER = "default"

GENERATION_MODES = {
    "auto": (True, True),  # generated tokens: only interventions whose positions are "every position"
    "prompt": (True, False),
    "generated": (False, True),
    "prompt+generated": (True, True),
    "all": (True, True),
}
_GENERATION_MODES = GENERATION_MODES  # old private name, kept for code written against 0.1


def _tensor_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    return dict(inputs.items()) if hasattr(inputs, "items") else dict(inputs)


class ReftModel(nn.Module):
    """A base model plus interventions. Build it with :func:`reftlib.get_reft_model`.

    Calling conventions:

    * ``reft_model(input_ids=..., attention_mask=..., unit_locations=...)`` returns the
      model outputs (what the base model returns);
    * ``reft_model(inputs_dict, unit_locations=...)`` (pyreft style) returns
      ``(original_outputs_or_None, intervened_outputs)``.
    """

    def __init__(self, model: nn.Module, config: ReftConfig | None = None, adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        if not isinstance(model, nn.Module) or getattr(model, "config", None) is None:
            raise ReftConfigError("get_reft_model needs a Hugging Face model (an nn.Module with a .config)")
        if isinstance(model, ReftModel):
            raise ReftConfigError("this model already is a ReftModel; add more interventions with add_adapter()")
        self.model = model
        self.adapters = nn.ModuleDict()
        self.reft_configs: dict[str, ReftConfig] = {}
        self._adapter_sites: dict[str, dict[str, Site]] = {}
        self._site_hooks: dict[tuple[str, str], SiteHook] = {}
        self._active: list[str] = []
        self._state: CallState | None = None
        self._in_call = False
        self._disabled = False
        # On the innermost model: PEFT wrappers run generate() on the model they wrap, never through their forward.
        self._tracker = _innermost_model(model).register_forward_pre_hook(self._track_chunk, with_kwargs=True)
        if config is not None:
            self.add_adapter(adapter_name, config)

    # ------------------------------------------------------------------ base-model access
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("model", "adapters") or name.startswith("_"):
                raise
            return getattr(self.model, name)

    @property
    def config(self):
        """The base model's config (so ``Trainer`` and ``generate`` helpers work unchanged)."""
        return self.model.config

    @property
    def reft_config(self) -> ReftConfig:
        """The config of the first active adapter."""
        if not self._active:
            raise AdapterError("no adapter is active; call set_adapter(name)")
        return self.reft_configs[self._active[0]]

    @property
    def interventions(self) -> dict[str, Intervention]:
        """``key -> intervention`` of the active adapters (pyreft's ``reft_model.interventions``)."""
        return {key: iv for name in self._active for key, iv in self.adapters[name].items()}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ adapters
    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        return self._active[0] if self._active else ""

    @property
    def adapter_names(self) -> list[str]:
        return list(self.adapters.keys())

    def add_adapter(self, adapter_name: str, config: ReftConfig, *, set_active: bool | None = None) -> None:
        """Attach the interventions of ``config`` under ``adapter_name``.

        The first adapter becomes active; later ones become active only with ``set_active=True``.
        """
        if not isinstance(adapter_name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", adapter_name):
            raise AdapterError(f"adapter name {adapter_name!r} must be letters, digits, '_' or '-'")
        if adapter_name in self.adapters:
            raise AdapterError(
                f"an adapter named {adapter_name!r} already exists; pick another name or delete_adapter() it first"
            )
        if not isinstance(config, ReftConfig):
            config = ReftConfig(representations=config)
        reps = config.representations
        sites = [resolve_site(self.model, rep.layer, rep.component) for rep in reps]
        probes = self._probe(sites)
        modules = nn.ModuleDict()
        site_of_key: dict[str, Site] = {}
        for rep, site in zip(reps, sites):
            key = self._key_for(rep, site, modules)
            shape, device = probes[site.key]
            self._build(rep, site, shape)
            rep.intervention.to(device)
            modules[key] = rep.intervention
            site_of_key[key] = site
            rep.name = key
        if config.base_model_type is None:
            config.base_model_type = getattr(text_config(self.model), "model_type", None)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(self.model.config, "_name_or_path", None) or None
        self.adapters[adapter_name] = modules
        self.reft_configs[adapter_name] = config
        self._adapter_sites[adapter_name] = site_of_key
        for key, site in site_of_key.items():
            hook = self._site_hooks.get(site.key)
            if hook is None:
                hook = self._site_hooks[site.key] = SiteHook(site, self._get_state)
            # Positions are looked up per call by the qualified key "adapter.key" (see _make_state).
            hook.entries.append((adapter_name, f"{adapter_name}.{key}", modules[key]))
        if set_active or (set_active is None and not self._active):
            self._active.append(adapter_name)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Make ``adapter_name`` (or a list, applied in that order) the active adapter(s)."""
        names = [adapter_name] if isinstance(adapter_name, str) or not isinstance(adapter_name, Sequence) \
            else list(adapter_name)
        for name in names:
            self._check_adapter(name)
        if len(set(names)) != len(names):
            raise AdapterError(f"adapter list {names} names an adapter twice")
        self._active = names
        for name, modules in self.adapters.items():
            for param in modules.parameters():
                param.requires_grad_(name in names)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter and its hooks entries (sites left empty lose their hook)."""
        self._check_adapter(adapter_name)
        for key, hook in list(self._site_hooks.items()):
            hook.entries = [e for e in hook.entries if e[0] != adapter_name]
            if not hook.entries:
                hook.remove()
                del self._site_hooks[key]
        del self.adapters[adapter_name]
        del self.reft_configs[adapter_name]
        del self._adapter_sites[adapter_name]
        self._active = [a for a in self._active if a != adapter_name]

    def _check_adapter(self, name: Any) -> None:
        if not isinstance(name, str) or name not in self.adapters:
            raise AdapterError(f"unknown adapter {name!r}; this model has adapters {self.adapter_names}")

    @staticmethod
    def _key_for(rep: RepresentationConfig, site: Site, taken: Mapping[str, Any]) -> str:
        if rep.name:
            key = rep.name
        elif site.layer is not None and rep.component == site.component and "." not in rep.component:
            key = f"layer_{site.layer}_{rep.component}"
        else:
            key = re.sub(r"[^A-Za-z0-9_]", "_", rep.component)
        if not re.fullmatch(r"[A-Za-z0-9_\-#]+", key):
            raise ReftConfigError(f"intervention name {key!r} may only contain letters, digits, '_', '-' or '#'")
        base, n = key, 1
        while key in taken:
            key = f"{base}_{n}"
            n += 1
        return key

    def _probe(self, sites: list[Site]) -> dict[tuple[str, str], tuple[torch.Size, torch.device]]:
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
        embeddings = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        weight = getattr(embeddings, "weight", None)
        if weight is not None and weight.device.type == "meta":
            raise ArchitectureError("the model's weights are on the 'meta' device; load real weights before attaching")
        device = weight.device if weight is not None else self.device
        state, self._state = self._state, None
        try:
            with torch.no_grad():
                ids = torch.tensor([[1, 2]], device=device)
                self.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        except Exception as exc:
            raise ArchitectureError(
                f"reftlib runs a 2-token forward to find the shapes at each site, and {type(self.model).__name__} "
                f"failed on it: {exc}. Models that need more than input_ids (e.g. encoder-decoder) are not supported"
            ) from exc
        finally:
            self._state = state
            for handle in handles:
                handle.remove()
        for site in sites:
            if site.key not in found:
                raise ArchitectureError(
                    f"site {site.path} ({site.kind}) for component {site.component!r} never received a tensor "
                    "during a forward pass; choose another component or module path"
                )
        return found

    @staticmethod
    def _build(rep: RepresentationConfig, site: Site, shape: torch.Size) -> None:
        width = int(shape[-1])
        iv = rep.intervention
        if site.num_heads:
            heads = site.num_heads
            if width % heads:
                raise ArchitectureError(
                    f"{site.path} input has width {width}, not divisible by num_attention_heads={heads}"
                )
            iv.build(width, num_heads=heads, head_dim=width // heads)
        else:
            if iv.unit == "h.pos":
                raise ReftConfigError(f"{type(iv).__name__} needs component='head_output'")
            iv.build(width)

    # ------------------------------------------------------------------ per-call state
    def _get_state(self) -> CallState | None:
        return self._state

    def _track_chunk(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        state = self._state
        if state is None:
            return
        if not self._in_call:
            self._state = None  # stale state kept for gradient checkpointing: the base model is called directly
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            return
        # transformers ≥ 5.25 names the KV cache argument ``cache`` (``past_key_values`` before).
        has_cache = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
        state.begin_chunk(ids.shape[1], has_cache)

    def _make_state(
        self,
        attention_mask: torch.Tensor,
        unit_locations: Any,
        adapter_names: Sequence[str | Sequence[str] | None] | None,
        on_prompt: bool = True,
        on_generated: bool = False,
        initial_offset: int = 0,
        all_positions: bool = False,
    ) -> CallState:
        """Resolve one call's adapters (per row) and positions into a :class:`CallState`.

        Positions are kept per qualified key ``"adapter.key"``, so two adapters whose
        interventions share a key may use different positions in the same call. A dict
        ``unit_locations`` may name an intervention by its qualified key (``"a.layer_1_block_output"``:
        that adapter only) or by its plain key (``"layer_1_block_output"``: every adapter of the
        call that has it); a qualified entry wins over a plain one. Integer dict keys and the
        per-intervention list form index the interventions in stacking order (adapters in call
        order, then each adapter's interventions in config order).
        """
        batch, length = attention_mask.shape
        if batch == 0:
            raise InputError("the batch is empty (0 rows); pass at least one example")
        if adapter_names is None:
            active, row_masks = list(self._active), {}
        else:
            active, row_masks = self._rows_of_adapters(adapter_names, batch)
        keys = [f"{name}.{key}" for name in active for key in self.adapters[name]]
        specs = {f"{name}.{rep.name}": rep.positions for name in active for rep in self.reft_configs[name].representations}
        if all_positions:
            positions = dict.fromkeys(keys)
        else:
            locations = self._qualify_locations(unit_locations, active)
            positions = normalize_unit_locations(locations, keys, specs, attention_mask)
        return CallState(
            positions=positions,
            batch_size=batch,
            prompt_length=length,
            active=tuple(active),
            on_prompt=on_prompt,
            on_generated=on_generated,
            enabled=not self._disabled,
            row_masks=row_masks,
            initial_offset=initial_offset,
        )

    def _rows_of_adapters(
        self, adapter_names: Sequence[str | Sequence[str] | None], batch: int
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
            stack = self._split_adapters(entry)
            for name in stack:
                self._check_adapter(name)
            if len(set(stack)) != len(stack):
                raise AdapterError(f"adapter_names[{i}] = {entry!r} names an adapter twice")
            stacks.append(stack)
        used = list(dict.fromkeys(name for stack in stacks for name in stack))
        after = {name: set() for name in used}  # after[a]: adapters that some row applies after a
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

    def _qualify_locations(self, unit_locations: Any, active: Sequence[str]) -> Any:
        """Rewrite a dict of positions keyed by plain intervention keys into qualified keys.

        Entries for adapters of the model that this call does not use are ignored, so one dict
        can serve every call; keys that no adapter has are an error.
        """
        if not isinstance(unit_locations, Mapping) or "sources->base" in unit_locations or "base" in unit_locations:
            return unit_locations
        owners: dict[str, list[str]] = {}
        for name in active:
            for key in self.adapters[name]:
                owners.setdefault(key, []).append(f"{name}.{key}")
        qualified_keys = {q for names in owners.values() for q in names}
        known = {f"{name}.{key}" for name, modules in self.adapters.items() for key in modules}
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
                    f"({list(active)}) have keys {sorted(owners)}, also accepted qualified as {sorted(qualified_keys)}"
                )
        return {**plain, **exact}

    @staticmethod
    def _split_adapters(name: str | Sequence[str] | None) -> list[Any]:
        if name is None:
            return []
        if isinstance(name, str) or not isinstance(name, Sequence):
            return [name]
        return list(name)

    @contextlib.contextmanager
    def _call(self, state: CallState) -> Iterator[None]:
        previous = (self._state, self._in_call)
        self._state, self._in_call = state, True
        try:
            yield
        finally:
            if previous[1]:  # a nested call: back to the outer call's state
                self._state = previous[0]
            elif (torch.is_grad_enabled() and self.training and _checkpointing(_innermost_model(self.model))
                  and not self._checkpoint_context_installed()):
                # Checkpointing enabled on the base model directly (no context_fn): backward re-runs
                # the hooked layers after forward() returned, so the last grad call's state stays
                # until the next call. One forward per backward is then required.
                self._state = state
            else:  # keep a state retained for checkpointing across no-grad calls (a DPO reference pass)
                self._state = previous[0]
            self._in_call = previous[1]

    def _checkpoint_context_installed(self) -> bool:
        """Whether the base model's checkpointing carries :meth:`_checkpoint_contexts` (set by our enable)."""
        for module in _innermost_model(self.model).modules():
            func = getattr(module, "_gradient_checkpointing_func", None)
            if func is not None:
                keywords = getattr(func, "keywords", None) or {}
                return getattr(keywords.get("context_fn"), "__self__", None) is self
        return False

    @contextlib.contextmanager
    def disable_interventions(self) -> Iterator[None]:
        """Run the base model with every intervention switched off (e.g. as a DPO reference)."""
        previous = self._disabled
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = previous

    disable_adapter = disable_interventions  # PEFT's name

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        base: Mapping[str, Any] | None = None,
        unit_locations: Any = None,
        labels: torch.Tensor | None = None,
        *,
        sources: Any = None,
        intervention_locations: torch.Tensor | None = None,
        adapter_names: Sequence[str | None] | None = None,
        output_original_output: bool = False,
        check_finite: bool = False,
        **model_kwargs: Any,
    ):
        """Run the model with interventions at ``unit_locations`` (see :mod:`reftlib.positions`).

        ``intervention_locations`` (``[batch, n_interventions, n_positions]``, from reftlib's
        data collators) is accepted as an alternative to ``unit_locations``.

        ``adapter_names`` (one entry per row) mixes adapters in one batch: a name, ``None``
        (the base model for that row) or a list of names stacked in that order (the first is
        applied first). Without it, the active adapters (:meth:`set_adapter`) act on every row.
        A dict ``unit_locations`` may key an intervention as ``"adapter.key"`` (that adapter
        only) or ``"key"`` (every adapter of the call that has it).
        """
        if sources is not None:
            raise InputError("reftlib interventions take no source inputs (interchange interventions are not supported)")
        pyreft_style = base is not None
        inputs = _tensor_inputs(base) if pyreft_style else {}
        inputs.update(model_kwargs)
        if labels is not None:
            inputs["labels"] = labels
        if intervention_locations is not None:
            if unit_locations is not None:
                raise PositionError("give unit_locations or intervention_locations, not both")
            unit_locations = {"sources->base": (None, intervention_locations.permute(1, 0, 2))}
        attention_mask = self._attention_mask(inputs)
        cache = inputs.get("cache", inputs.get("past_key_values"))
        cached = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        self._check_length(self._input_length(inputs) + int(cached), "the input")
        # Positions index the input_ids of this call (also when a KV cache holds earlier tokens).
        state = self._make_state(attention_mask[:, -self._input_length(inputs):], unit_locations, adapter_names)
        state.check_finite = check_finite
        original = None
        if output_original_output:
            with torch.no_grad(), self.disable_interventions():
                original = self.model(**inputs)
        with self._call(state):
            outputs = self.model(**inputs)
        return (original, outputs) if pyreft_style else outputs

    def _check_length(self, length: int, what: str) -> None:
        """Refuse sequences longer than the model's position table (an index error or silent garbage otherwise)."""
        limit = _max_positions(self.model)
        if limit is not None and length > limit:
            raise InputError(
                f"{what} has {length} tokens but the model handles at most {limit} (config.max_position_embeddings); "
                f"truncate it, e.g. tokenizer(..., truncation=True, max_length={limit})"
            )

    @staticmethod
    def _input_length(inputs: Mapping[str, Any]) -> int:
        ids = inputs.get("input_ids")
        if ids is None:
            ids = inputs.get("inputs_embeds")
        if ids is None:
            raise InputError("pass input_ids (or inputs_embeds)")
        return ids.shape[1]

    def _attention_mask(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        ids = inputs.get("input_ids")
        if ids is None:
            ids = inputs.get("inputs_embeds")
        if ids is None:
            raise InputError("pass input_ids (or inputs_embeds) to the model")
        if ids.dim() < 2:
            raise InputError(f"input_ids must be [batch, seq_len], got shape {tuple(ids.shape)}; add a batch dimension")
        if ids.shape[0] == 0:
            raise InputError("the batch is empty (0 rows); pass at least one example")
        mask = inputs.get("attention_mask")
        if mask is None:
            return torch.ones(ids.shape[:2], dtype=torch.long)
        if mask.dim() != 2 or mask.shape[0] != ids.shape[0]:
            raise InputError(
                f"attention_mask shape {tuple(mask.shape)} does not match input_ids shape {tuple(ids.shape[:2])}"
            )
        return mask

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        base: Mapping[str, Any] | None = None,
        unit_locations: Any = None,
        intervene_on_prompt: bool = True,
        *,
        mode: str | None = None,
        adapter_names: Sequence[str | None] | None = None,
        output_original_output: bool = False,
        sources: Any = None,
        **generate_kwargs: Any,
    ):
        """Generate with interventions, using the KV cache.

        ``mode`` chooses where interventions act:

        * ``"auto"`` (default): each intervention where its positions say. Position-restricted
          ones (``unit_locations`` or configured ``positions`` such as ``"l1"``) act on those
          prompt positions only; interventions on every position (``positions=None``, e.g.
          LoFiT's head offsets) act on the whole prompt *and* on every generated token, as in
          a forward pass over the full sequence.
        * ``"prompt"``: at ``unit_locations`` in the prompt only, whatever the positions. Decode
          steps run the plain model on top of the intervened cache.
        * ``"generated"``: at every generated token (each new token fed back as input, i.e.
          positions ≥ the prompt length), not on the prompt. Same as ``intervene_on_prompt=False``.
        * ``"prompt+generated"``: at ``unit_locations`` in the prompt and at every generated token.
        * ``"all"``: at every position, prompt and generated.

        Positions index the (left-)padded ``input_ids`` as given; position specs such as
        ``"l1"`` are resolved per row from the attention mask. With a dict as first argument
        (pyreft style) returns ``(None_or_original, generated)``, otherwise the generated ids.
        ``adapter_names`` mixes adapters per row exactly as in :meth:`forward`.
        """
        if sources is not None:
            raise InputError("reftlib interventions take no source inputs (interchange interventions are not supported)")
        if mode is None:
            mode = "auto" if intervene_on_prompt else "generated"
        if mode not in GENERATION_MODES:
            raise ReftConfigError(f"unknown generation mode {mode!r}; use one of {list(GENERATION_MODES)}")
        on_prompt, on_generated = GENERATION_MODES[mode]
        pyreft_style = base is not None
        inputs = _tensor_inputs(base) if pyreft_style else {}
        for name in ("input_ids", "attention_mask", "inputs_embeds"):
            if name in generate_kwargs:
                inputs[name] = generate_kwargs.pop(name)
        attention_mask = self._attention_mask(inputs)
        if "attention_mask" not in inputs:
            inputs["attention_mask"] = attention_mask.to(self._input_device(inputs))
        self._check_length(attention_mask.shape[1], "the prompt")
        ids = inputs.get("input_ids")
        if ids is not None and bool((attention_mask[:, -1] == 0).any()):
            raise InputError(
                    "batched generation needs LEFT padding (some rows end with padding); set "
                "tokenizer.padding_side = 'left' before tokenizing"
            )
        state = self._make_state(attention_mask, unit_locations, adapter_names, on_prompt, on_generated,
                                 all_positions=(mode == "all"))
        if mode == "auto":  # generated tokens: the interventions that act on every position
            state.generated_keys = frozenset(key for key, pos in state.positions.items() if pos is None)
            state.on_generated = bool(state.generated_keys)
        original = None
        if output_original_output:
            with self.disable_interventions():
                original = self.model.generate(**inputs, **generate_kwargs)
        with self._call(state):
            generated = self.model.generate(**inputs, **generate_kwargs)
        return (original, generated) if pyreft_style else generated

    @staticmethod
    def _input_device(inputs: Mapping[str, Any]) -> torch.device:
        ids = inputs.get("input_ids")
        return (ids if ids is not None else inputs["inputs_embeds"]).device

    # ------------------------------------------------------------------ utilities
    def count_parameters(self, trainable_only: bool = True) -> int:
        """Number of intervention parameters (of active adapters when ``trainable_only``)."""
        modules = [self.adapters[n] for n in self._active] if trainable_only else list(self.adapters.values())
        return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad or not trainable_only)

    def print_trainable_parameters(self) -> None:
        """Print intervention vs model parameter counts (pyreft's format)."""
        trainable = sum(p.numel() for n, p in self.named_parameters() if p.requires_grad and not n.startswith("model."))
        model_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        print(
            f"trainable intervention params: {trainable:,d} || trainable model params: {model_trainable:,d}\n"
            f"model params: {total:,d} || trainable%: {100 * (trainable + model_trainable) / max(total, 1):.6f}"
        )

    def set_device(self, device: str | torch.device, set_model: bool = True) -> ReftModel:
        """Move interventions (and, by default, the base model) to ``device``."""
        if set_model:
            self.model.to(device)
        for modules in self.adapters.values():
            modules.to(device)
        return self

    def get_device(self) -> torch.device:
        return self.device

    def train(self, mode: bool = True) -> ReftModel:
        """Train mode for the model and every intervention (dropout on)."""
        super().train(mode)
        return self

    def enable_input_require_grads(self) -> None:
        self.model.enable_input_require_grads()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        **kwargs: Any) -> None:
        """Enable activation (gradient) checkpointing on the base model, set up for interventions.

        Checkpointing is non-reentrant, and every checkpointed layer remembers the call it ran in
        (``context_fn``), so the recomputation in backward applies that call's interventions at
        that call's positions, also when several forward calls precede one backward (DPO's chosen
        and rejected batches). ``transformers`` 5 names this ``activation_checkpointing_enable``;
        :meth:`gradient_checkpointing_enable` is the same.
        """
        options = {"use_reentrant": False, "context_fn": self._checkpoint_contexts,
                   **(activation_checkpointing_kwargs or {})}
        enable = getattr(self.model, "activation_checkpointing_enable", None)
        if callable(enable):
            enable(activation_checkpointing_kwargs=options, **kwargs)
        else:  # transformers < 5
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs: Any) -> None:
        """Same as :meth:`activation_checkpointing_enable` (the name before ``transformers`` 5)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        disable = getattr(self.model, "activation_checkpointing_disable", None)
        (disable if callable(disable) else self.model.gradient_checkpointing_disable)()

    gradient_checkpointing_disable = activation_checkpointing_disable

    def _checkpoint_contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """``context_fn`` of torch's checkpoint: the recomputation runs with the state of the call that ran forward."""
        return contextlib.nullcontext(), self._running(self._state)

    @contextlib.contextmanager
    def _running(self, state: CallState | None) -> Iterator[None]:
        previous = (self._state, self._in_call)
        self._state, self._in_call = state, state is not None
        try:
            yield
        finally:
            self._state, self._in_call = previous

    def detach(self) -> nn.Module:
        """Remove every hook reftlib added and return the untouched base model."""
        for hook in self._site_hooks.values():
            hook.remove()
        self._site_hooks.clear()
        self._tracker.remove()
        self._state = None
        return self.model

    unload = detach

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory, *, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> None:
        """Write safetensors + JSON config (one subfolder per non-default adapter), atomically."""
        from .io import save_reft_model

        save_reft_model(self, save_directory, adapter_names=adapter_names, **kwargs)

    def save(self, save_directory, save_to_hf_hub: bool = False, hf_repo_name: str | None = None, **kwargs: Any) -> None:
        """pyreft-compatible alias of :meth:`save_pretrained` (optionally pushing to the Hub)."""
        self.save_pretrained(save_directory, **kwargs)
        if save_to_hf_hub:
            if not hf_repo_name:
                raise ReftConfigError("save_to_hf_hub=True needs hf_repo_name='user/name'")
            self.push_to_hub(hf_repo_name)

    @classmethod
    def from_pretrained(cls, path_or_repo_id, model: nn.Module, *, adapter_name: str = DEFAULT_ADAPTER,
                        is_trainable: bool = False, disable_model_grads: bool = True, **hub_kwargs: Any) -> ReftModel:
        """Load saved interventions onto ``model`` (local folder, Hub repo id, or offline HF cache).

        The base model is frozen unless ``disable_model_grads=False`` (e.g. to keep LoRA trainable).
        Subclasses (e.g. the sequence-classification model) are rebuilt as themselves.
        """
        from .io import load_reft_model

        return load_reft_model(path_or_repo_id, model, adapter_name=adapter_name, is_trainable=is_trainable,
                               disable_model_grads=disable_model_grads, reft_model_class=cls, **hub_kwargs)

    @classmethod
    def load(cls, path_or_repo_id, model: nn.Module, **kwargs: Any) -> ReftModel:
        """pyreft-compatible alias of :meth:`from_pretrained`."""
        return cls.from_pretrained(path_or_repo_id, model, **kwargs)

    def load_adapter(self, path_or_repo_id, adapter_name: str, *, is_trainable: bool = False, **hub_kwargs: Any) -> None:
        """Load a saved adapter next to the existing ones under ``adapter_name``.

        ``path_or_repo_id`` is a folder (or Hub repo) written by :meth:`save_pretrained`. When it
        holds several adapters, the one saved under ``adapter_name`` is loaded (from its
        subfolder); another name loads the adapter saved at the root. ``subfolder=`` picks a
        subfolder explicitly. Which adapters are active does not change.
        """
        from .io import load_adapter_into

        load_adapter_into(self, path_or_repo_id, adapter_name, is_trainable=is_trainable, **hub_kwargs)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload reftlib interventions", **kwargs: Any):
        """Upload the saved interventions and a generated model card through ``huggingface_hub``."""
        from .io import push_to_hub

        return push_to_hub(self, repo_id, private=private, token=token, commit_message=commit_message, **kwargs)


def _innermost_model(model: nn.Module) -> nn.Module:
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


def _max_positions(model: nn.Module) -> int | None:
    """The longest sequence the model's config allows (``max_position_embeddings`` or its aliases), if known."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _checkpointing(model: nn.Module) -> bool:
    flag = getattr(type(model), "is_activation_checkpointing", None)
    if flag is not None:
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def get_reft_model(model: nn.Module, config: ReftConfig | Mapping | Sequence, *, set_device: bool = True,
                   disable_model_grads: bool = True, adapter_name: str = DEFAULT_ADAPTER) -> ReftModel:
    """Attach the interventions described by ``config`` to ``model`` and return a :class:`ReftModel`.

    The base model's parameters are frozen (``disable_model_grads``); interventions are
    placed on the device of the layer they attach to (``set_device``).
    """
    if not isinstance(config, ReftConfig):
        config = ReftConfig(representations=config)
    if disable_model_grads:
        for param in model.parameters():
            param.requires_grad_(False)
    return ReftModel(model, config, adapter_name=adapter_name)
