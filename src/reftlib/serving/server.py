"""``reftlib serve``: vLLM's OpenAI-compatible server with reftlib adapters chosen by model name.

    reftlib serve path/to/base-model --adapter emoji=runs/emoji --adapter lofit=runs/lofit \\
        --dtype float32 --max-model-len 512 --port 8000

A client picks an adapter the way it picks one of vLLM's ``--lora-modules``: ``model="emoji"``;
``model="emoji+lofit"`` stacks adapters in that order (as ``ReftModel.generate``'s list entries);
``model=<the base model's served name>`` (or no model) is the base model. ``GET /v1/models`` lists
the base model and every adapter (``parent`` is the base model). An unknown name gets a 404 in
OpenAI's error format listing the served names.

How: vLLM's server runs unchanged, with one ASGI middleware (:class:`AdapterRouter`, added through
vLLM's ``--middleware`` option) in front of it. For ``/v1/completions`` and
``/v1/chat/completions`` the middleware rewrites a request for adapter ``NAME`` into a request for
the base model that carries ``vllm_xargs={"reftlib_adapter": NAME}`` (vLLM passes ``vllm_xargs`` to
``SamplingParams.extra_args``, where the worker hooks read each request's adapter, see
:mod:`reftlib.serving.vllm_backend`) and a ``cache_salt`` (the prefix-cache rule below). Everything
else (streaming, sampling options, tools, the other endpoints) is vLLM's own.

Prefix caching: a request served by an adapter never shares KV blocks with the base model or
another adapter. Adapters acting on every position (LoFiT, ``"all"``) edit a token from its prefix
alone, so all requests of the adapter share blocks. Adapters whose positions count from the
prompt's end (``"l1"``) edit a prefix differently in different prompts; here (the server sees the
request before it is tokenized) their requests share blocks only with requests whose prompt
fields are identical (the salt includes a hash of every field other than the sampling options).

This module does not import vLLM; starting the server does (:func:`serve`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import AdapterError, InputError, RequestRefusedError
from .adapters import ServedAdapter, load_served_adapters, read_model_config
from .vllm_backend import ADAPTER_ARG, check_vllm_version, run_openai_server, server_arguments

__all__ = ["ROUTED_PATHS", "AdapterRouter", "ServerRoutes", "parse_adapter_specs", "route_request", "serve"]

#: The endpoints whose requests may name an adapter as their ``model``.
ROUTED_PATHS = ("/v1/completions", "/v1/chat/completions")

# Request fields that change how tokens are sampled, not which prompt tokens the model reads: a
# prompt-position adapter's cache salt ignores them (any other field, known or not, is hashed).
_SAMPLING_FIELDS = frozenset({
    "model", "max_tokens", "max_completion_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p",
    "n", "best_of", "seed", "stream", "stream_options", "stop", "stop_token_ids", "include_stop_str_in_output",
    "ignore_eos", "logprobs", "top_logprobs", "prompt_logprobs", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "length_penalty", "logit_bias", "user", "request_id", "priority", "cache_salt",
    "vllm_xargs", "return_tokens_as_token_ids", "skip_special_tokens", "spaces_between_special_tokens",
})

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class ServerRoutes:
    """What the server serves: the base model's names (the first is the one vLLM is asked for) and adapters."""

    base_names: tuple[str, ...]
    adapters: Mapping[str, ServedAdapter]

    def served_names(self) -> list[str]:
        return [*self.base_names, *self.adapters]

    def stack(self, model: Any) -> list[ServedAdapter] | None:
        """The adapters ``model`` names: one adapter, or ``"A+B"`` (stacked in that order); ``None`` if unknown."""
        if not isinstance(model, str):
            return None
        if model in self.adapters:
            return [self.adapters[model]]
        names = model.split("+")
        if len(names) < 2 or len(set(names)) != len(names) or not all(name in self.adapters for name in names):
            return None
        return [self.adapters[name] for name in names]


def parse_adapter_specs(specs: Sequence[str], option: str = "--adapter", example: str = "emoji=runs/emoji") -> dict[str, str]:
    """``["NAME=VALUE", ...]`` -> ``{NAME: VALUE}``, refusing malformed or repeated names.

    ``option`` and ``example`` name the command-line option in the errors (``--pyreft-positions`` uses it too).
    """
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise InputError(f"{option} {spec!r}: write NAME={'PATH' if option == '--adapter' else 'VALUE'}, "
                             f"e.g. {option} {example}")
        if name in adapters:
            raise InputError(f"{option}: the name {name!r} is given twice; give each adapter its own name")
        if "+" in name:
            raise InputError(f"{option} {spec!r}: '+' stacks adapters in a request's model name; rename the adapter")
        adapters[name] = value
    return adapters


def _prompt_digest(payload: Mapping[str, Any]) -> str:
    """A hash of every request field that can change the prompt's tokens."""
    fields = {key: value for key, value in payload.items() if key not in _SAMPLING_FIELDS}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


def route_request(payload: Mapping[str, Any], routes: ServerRoutes) -> dict[str, Any]:
    """The request vLLM gets for a client request ``payload`` (a completions or chat body).

    Base-model requests pass unchanged. A request for adapter ``NAME`` asks for the base model and
    carries the adapter in ``vllm_xargs`` and a ``cache_salt`` (see the module docs). Raises
    :class:`RequestRefusedError` for an unknown model and for a client that sets the adapter argument
    itself (that would bypass the cache salt).
    """
    xargs = payload.get("vllm_xargs") or {}
    if isinstance(xargs, Mapping) and ADAPTER_ARG in xargs:
        raise RequestRefusedError(400, f"vllm_xargs[{ADAPTER_ARG!r}] is set by the server; choose an adapter with "
                                f"model=NAME (served: {', '.join(routes.served_names())})", "BadRequestError")
    model = payload.get("model")
    if model is None or model in routes.base_names:
        return dict(payload)
    stack = routes.stack(model)
    if stack is None:
        raise RequestRefusedError(404, f"The model `{model}` does not exist. Served: {', '.join(routes.served_names())} "
                                       f"(the base model: {routes.base_names[0]}; stack adapters with "
                                       "model=NAME+NAME).", "NotFoundError")
    names = [adapter.name for adapter in stack]
    digest = _prompt_digest(payload) if any(adapter.prompt_length_matters for adapter in stack) else ""
    # vLLM's API takes salts of at most 128 characters without "/" or "@": hash the parts.
    salt = "reftlib-" + hashlib.sha256(json.dumps([names, digest, payload.get("cache_salt")]).encode()).hexdigest()[:40]
    return {**payload, "model": routes.base_names[0],
            "vllm_xargs": {**xargs, ADAPTER_ARG: names if len(names) > 1 else names[0]}, "cache_salt": salt}


def model_cards(base_listing: Mapping[str, Any], routes: ServerRoutes) -> dict[str, Any]:
    """vLLM's ``/v1/models`` answer with one card per adapter appended (a copy of the base card)."""
    cards = list(base_listing.get("data") or [])
    base = next((card for card in cards if card.get("id") == routes.base_names[0]), cards[0] if cards else {})
    now = int(time.time())
    for name, adapter in routes.adapters.items():
        cards.append({**base, "id": name, "object": "model", "created": now, "owned_by": "reftlib",
                      "root": adapter.folder, "parent": routes.base_names[0]})
    return {**base_listing, "object": "list", "data": cards}


_routes: ServerRoutes | None = None


def set_server_routes(routes: ServerRoutes | None) -> None:
    """Install what :class:`AdapterRouter` routes (``serve`` does this before the app is built)."""
    global _routes
    _routes = routes


class AdapterRouter:
    """ASGI middleware: requests for an adapter go to the base model with the adapter attached.

    vLLM builds it through ``--middleware`` (``app.add_middleware(AdapterRouter)``); it reads the
    routes installed with :func:`set_server_routes` in the server's process.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        routes = _routes
        if routes is None or scope.get("type") != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method", "")
        if method == "GET" and path.rstrip("/") == "/v1/models":
            return await self._list_models(routes, scope, receive, send)
        if method == "POST" and path.rstrip("/") in ROUTED_PATHS:
            return await self._route(routes, scope, receive, send)
        return await self.app(scope, receive, send)

    async def _route(self, routes: ServerRoutes, scope: Scope, receive: Receive, send: Send) -> None:
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if isinstance(payload, dict):
            try:
                body = json.dumps(route_request(payload, routes)).encode()
            except RequestRefusedError as refusal:
                error = {"message": str(refusal), "type": refusal.error_type, "param": "model", "code": refusal.status}
                return await _send_json(send, refusal.status, {"error": error})
        # Anything that is not a JSON object goes to vLLM as it came, for vLLM's own error.
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        replayed = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _list_models(self, routes: ServerRoutes, scope: Scope, receive: Receive, send: Send) -> None:
        start: MutableMapping[str, Any] = {}
        chunks: list[bytes] = []

        async def capture(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        status = int(start.get("status", 500))
        try:
            listing = json.loads(b"".join(chunks)) if status == 200 else None
        except ValueError:
            listing = None
        if not isinstance(listing, dict):  # pass vLLM's answer through untouched
            await send({**start, "type": "http.response.start"} if start else
                       {"type": "http.response.start", "status": status, "headers": []})
            return await send({"type": "http.response.body", "body": b"".join(chunks)})
        return await _send_json(send, 200, model_cards(listing, routes))


async def _send_json(send: Send, status: int, payload: Any) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def serve(model: str | os.PathLike, adapters: Mapping[str, str | os.PathLike], vllm_args: Sequence[str] = (), *,
          pyreft_positions: Mapping[str, str] | None = None) -> None:
    """Run vLLM's OpenAI-compatible server for ``model`` with ``{name: folder}`` adapters (blocks until stopped).

    ``vllm_args`` are ``vllm serve`` options (``--port``, ``--dtype``, ``--max-model-len``, ...).
    ``pyreft_positions`` gives ``{name: spec}`` for adapters saved by pyreft, which records no positions.
    Every adapter is built and checked here first, so one that cannot be served is refused with
    :class:`~reftlib.errors.AdapterError` before the engine starts; so are settings the hooks cannot
    work under (:func:`reftlib.serving.vllm_backend.server_arguments`).
    """
    check_vllm_version()
    model_config = read_model_config(model)
    served = load_served_adapters(adapters, model_config, pyreft_positions)
    args = server_arguments(str(model), vllm_args, middleware=f"{__name__}.AdapterRouter", model_config=model_config,
                            adapters=served.values())
    base_names = tuple(args.served_model_name or [args.model])
    clash = sorted(set(base_names) & set(served))
    if clash:
        raise AdapterError(f"adapter names {clash} are also the base model's served name; rename the adapters")
    set_server_routes(ServerRoutes(base_names=base_names, adapters=served))
    try:
        run_openai_server(args, {name: adapter.source for name, adapter in served.items()}, model_config)
    finally:
        set_server_routes(None)
