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

from .checks import describe, register_reft_model_class, require_model
from .components import Site, find_layers, resolve_site, text_config
from .config import DEFAULT_ADAPTER, ReftConfig, RepresentationConfig
from .errors import AdapterError, ArchitectureError, InputError, ReftConfigError
from .inputs import as_input_dict, attention_mask_of, check_length, input_device, input_length
from .interventions import Intervention
from .io import load_adapter_into, load_reft_model, save_reft_model
from .io import push_to_hub as _push_to_hub
from .merge import merge_and_unload as _fold_and_unload
from .plan import GENERATION_MODES, AdapterSpecs, CallPlan, build_plan
from .runtime import HFRuntime, cached_length

_GENERATION_MODES = GENERATION_MODES  # old private name, kept for code written against 0.1


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
        if isinstance(model, ReftModel):
            raise ReftConfigError("this model already is a ReftModel; add more interventions with add_adapter()")
        require_model(model, "model", type(self).__name__)
        self.model = model
        self.adapters = nn.ModuleDict()
        self.reft_configs: dict[str, ReftConfig] = {}
        self._adapter_sites: dict[str, dict[str, Site]] = {}
        self._active: list[str] = []
        #: Executes each call's plan on the base model (hooks, KV-cache tracking, checkpointing).
        self.runtime = HFRuntime(model)
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
    def _no_split_modules(self) -> list[str]:
        """Decoder-layer class names (Hugging Face's convention): what FSDP and ``device_map`` keep whole."""
        return sorted({type(layer).__name__ for layer in find_layers(self.model)[1]})

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
        _check_config(config, "add_adapter")
        # The model works on its own copy: nothing is written back into the caller's config, and an
        # intervention instance already owned by another model is replaced by a fresh one (no shared parameters).
        config = (config if isinstance(config, ReftConfig) else ReftConfig(representations=config)).copy()
        reps = config.representations
        sites = [resolve_site(self.model, rep.layer, rep.component) for rep in reps]
        probes = self.runtime.probe(sites)
        modules = nn.ModuleDict()
        site_of_key: dict[str, Site] = {}
        for rep, site in zip(reps, sites):
            if not rep.intervention.claim():
                rep.intervention = rep.new_intervention()
                rep.intervention.claim()
            rep.bind(rep.intervention)
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
            # Positions are looked up per call by the qualified key "adapter.key" (see reftlib.plan).
            self.runtime.add(site, adapter_name, f"{adapter_name}.{key}", modules[key])
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
        self.runtime.remove_adapter(adapter_name)
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

    # ------------------------------------------------------------------ per-call plan
    @property
    def adapter_specs(self) -> AdapterSpecs:
        """``adapter -> [(intervention key, configured positions), ...]``: what a call plan needs to know."""
        return {name: [(rep.name, rep.positions) for rep in config.representations]
                for name, config in self.reft_configs.items()}

    def plan_call(
        self,
        attention_mask: torch.Tensor,
        *,
        unit_locations: Any = None,
        intervention_locations: torch.Tensor | None = None,
        adapter_names: Sequence[str | Sequence[str] | None] | None = None,
        mode: str | None = None,
        check_finite: bool = False,
        initial_offset: int = 0,
    ) -> CallPlan:
        """The :class:`~reftlib.plan.CallPlan` of one call over inputs with this ``attention_mask``.

        ``forward`` and ``generate`` build one per call; runtimes other than the Hugging Face one
        (and subclasses that run the base model themselves) build it here and execute it.
        """
        return build_plan(self.adapter_specs, self._active, attention_mask, unit_locations=unit_locations,
                          intervention_locations=intervention_locations, adapter_names=adapter_names,
                          mode=mode, check_finite=check_finite, initial_offset=initial_offset)

    @contextlib.contextmanager
    def disable_interventions(self) -> Iterator[None]:
        """Run the base model with every intervention switched off (e.g. as a DPO reference)."""
        with self.runtime.interventions_disabled():
            yield

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
        inputs = as_input_dict(base) if pyreft_style else {}
        inputs.update(model_kwargs)
        if labels is not None:
            inputs["labels"] = labels
        attention_mask = attention_mask_of(inputs)
        cache = inputs.get("cache", inputs.get("past_key_values"))
        cached = cached_length(cache) or 0
        check_length(self.model, input_length(inputs) + int(cached), "the input")
        # Positions index the input_ids of this call (also when a KV cache holds earlier tokens).
        plan = self.plan_call(attention_mask[:, -input_length(inputs):], unit_locations=unit_locations,
                              intervention_locations=intervention_locations, adapter_names=adapter_names,
                              check_finite=check_finite, initial_offset=int(cached))
        original = None
        if output_original_output:
            with torch.no_grad(), self.disable_interventions():
                original = self.model(**inputs)
        with self.runtime.run(plan):
            outputs = self.model(**inputs)
        return (original, outputs) if pyreft_style else outputs

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
        pyreft_style = base is not None
        inputs = as_input_dict(base) if pyreft_style else {}
        for name in ("input_ids", "attention_mask", "inputs_embeds"):
            if name in generate_kwargs:
                inputs[name] = generate_kwargs.pop(name)
        attention_mask = attention_mask_of(inputs)
        if "attention_mask" not in inputs:
            inputs["attention_mask"] = attention_mask.to(input_device(inputs))
        check_length(self.model, attention_mask.shape[1], "the prompt")
        ids = inputs.get("input_ids")
        if ids is not None and bool((attention_mask[:, -1] == 0).any()):
            raise InputError(
                    "batched generation needs LEFT padding (some rows end with padding); set "
                "tokenizer.padding_side = 'left' before tokenizing"
            )
        plan = self.plan_call(attention_mask, unit_locations=unit_locations, adapter_names=adapter_names, mode=mode)
        original = None
        if output_original_output:
            with self.disable_interventions():
                original = self.model.generate(**inputs, **generate_kwargs)
        with self.runtime.run(plan):
            generated = self.model.generate(**inputs, **generate_kwargs)
        return (original, generated) if pyreft_style else generated

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
        options = {"use_reentrant": False, "context_fn": self.runtime.checkpoint_contexts,
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

    def detach(self) -> nn.Module:
        """Remove every hook reftlib added and return the untouched base model."""
        self.runtime.remove()
        return self.model

    unload = detach

    def get_base_model(self) -> nn.Module:
        """The model the interventions are attached to (PEFT's ``get_base_model``), hooks left in place.

        The same object as ``reft_model.model``; :meth:`detach` also removes reftlib's hooks.
        """
        return self.model

    def merge_and_unload(self, adapter_names: Sequence[str] | str | None = None) -> nn.Module:
        """Fold the interventions into the base weights and return the plain Hugging Face model.

        Only interventions whose edit is a constant affine map of the input of a linear projection,
        applied at every position, can be folded (``Intervention.foldable``: LoFiT's head scales and
        offsets among the built-ins). Anything else (LoReFT is input-dependent; ``"l1"`` positions act
        on one token) raises :class:`~reftlib.errors.MergeError` naming each such intervention, before
        any weight changes: there is no partial merge. ``adapter_names`` picks the adapters (default:
        the active ones, in stacking order); the others are dropped with the hooks.
        """
        return _fold_and_unload(self, adapter_names)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, save_directory, *, selected_adapters: Sequence[str] | None = None,
                        is_main_process: bool = True, state_dict: Mapping[str, torch.Tensor] | None = None,
                        safe_serialization: bool = True, adapter_names: Sequence[str] | None = None,
                        **kwargs: Any) -> None:
        """Write safetensors + JSON config (one subfolder per non-default adapter), atomically.

        PEFT's arguments: ``selected_adapters`` (default: every adapter; ``adapter_names`` is the older
        name), ``is_main_process=False`` writes nothing (call it on every rank), ``state_dict`` takes
        the weights from a gathered full state dict (FSDP) instead of the live modules, and
        ``safe_serialization`` must stay ``True`` (only safetensors are written). Any other keyword
        is refused with a :class:`~reftlib.errors.ReftConfigError`. See :func:`reftlib.io.save_reft_model`.
        """
        save_reft_model(self, save_directory, selected_adapters=selected_adapters, adapter_names=adapter_names,
                        is_main_process=is_main_process, state_dict=state_dict,
                        safe_serialization=safe_serialization, **kwargs)

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
        load_adapter_into(self, path_or_repo_id, adapter_name, is_trainable=is_trainable, **hub_kwargs)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload reftlib interventions", **kwargs: Any):
        """Upload the saved interventions and a generated model card through ``huggingface_hub``."""
        return _push_to_hub(self, repo_id, private=private, token=token, commit_message=commit_message, **kwargs)


register_reft_model_class(ReftModel)


def get_reft_model(model: nn.Module, config: ReftConfig | Mapping | Sequence, *, set_device: bool = True,
                   disable_model_grads: bool = True, adapter_name: str = DEFAULT_ADAPTER) -> ReftModel:
    """Attach the interventions described by ``config`` to ``model`` and return a :class:`ReftModel`.

    The base model's parameters are frozen (``disable_model_grads``); interventions are
    placed on the device of the layer they attach to (``set_device``).
    """
    require_model(model, "model", "get_reft_model")
    _check_config(config, "get_reft_model")
    if not isinstance(config, ReftConfig):
        config = ReftConfig(representations=config)
    if disable_model_grads:
        for param in model.parameters():
            param.requires_grad_(False)
    return ReftModel(model, config, adapter_name=adapter_name)


def _check_config(config: Any, where: str) -> None:
    """A ReftConfig, or what ``ReftConfig(representations=...)`` takes (a dict or a list of them)."""
    if isinstance(config, (ReftConfig, RepresentationConfig, Mapping)):
        return
    if isinstance(config, Sequence) and not isinstance(config, (str, bytes)):
        return
    raise ReftConfigError(
        f"{where}(config=...) expects a ReftConfig (or a representation dict, or a list of them), got "
        f"{describe(config)}; e.g. ReftConfig({{'layer': 4, 'component': 'block_output', 'intervention': 'loreft'}})"
    )
