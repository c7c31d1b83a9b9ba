"""The OpenAI server's adapter router, without vLLM: request rewriting, cache salts, /v1/models, refusals.

The server end to end (vLLM behind the router, the ``openai`` client in front) is tested in
``test_vllm_server.py``; this module checks the router's own logic on every CI machine.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json

import pytest

import reftlib
from reftlib.serving import ADAPTER_ARG
from reftlib.serving.adapters import ServedAdapter
from reftlib.serving.server import (
    AdapterRouter,
    ServerRoutes,
    parse_adapter_specs,
    route_request,
    set_server_routes,
)

ROUTES = ServerRoutes(
    base_names=("base", "base-alias"),
    adapters={
        "emoji": ServedAdapter("emoji", "/runs/emoji", (), (("layer_15_block_output", "l1"),)),
        "lofit": ServedAdapter("lofit", "/runs/lofit", (), (("layer_3_head_output", None),)),
    },
)
CHAT = {"model": "emoji", "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 8, "temperature": 0}


def test_base_model_requests_pass_unchanged():
    for model in ("base", "base-alias", None):
        payload = {**CHAT, "model": model}
        assert route_request(payload, ROUTES) == payload
    assert route_request({"prompt": "x"}, ROUTES) == {"prompt": "x"}


def test_adapter_requests_go_to_the_base_model_with_the_adapter_attached():
    routed = route_request({**CHAT, "vllm_xargs": {"session_id": "s"}}, ROUTES)
    assert routed["model"] == "base"
    assert routed["vllm_xargs"] == {"session_id": "s", ADAPTER_ARG: "emoji"}
    assert routed["messages"] == CHAT["messages"] and routed["max_tokens"] == 8
    salt = routed["cache_salt"]
    assert salt.startswith("reftlib-") and len(salt) <= 128 and not set(salt) & set("@/\\\0")


def test_cache_salt_rule():
    """Prompt-position adapters share blocks only between requests with the same prompt fields;
    every-position adapters share them across prompts; adapters never share with each other."""
    def salt(payload):
        return route_request(payload, ROUTES)["cache_salt"]

    other_prompt = {**CHAT, "messages": [{"role": "user", "content": "Hello!"}]}
    assert salt(CHAT) == salt({**CHAT, "max_tokens": 99, "temperature": 0.7, "stream": True})
    assert salt(CHAT) != salt(other_prompt)
    assert salt(CHAT) != salt({**CHAT, "add_generation_prompt": False})  # any non-sampling field counts
    assert salt({**CHAT, "model": "lofit"}) == salt({**other_prompt, "model": "lofit"})
    assert salt({**CHAT, "model": "lofit"}) != salt(CHAT)
    assert salt({**CHAT, "cache_salt": "user-1"}) != salt({**CHAT, "cache_salt": "user-2"}) != salt(CHAT)
    assert "cache_salt" not in route_request({**CHAT, "model": "base"}, ROUTES)


def test_stacked_adapters():
    routed = route_request({**CHAT, "model": "lofit+emoji"}, ROUTES)
    assert routed["vllm_xargs"] == {ADAPTER_ARG: ["lofit", "emoji"]} and routed["model"] == "base"
    assert routed["cache_salt"] != route_request({**CHAT, "model": "emoji+lofit"}, ROUTES)["cache_salt"]
    assert routed["cache_salt"] != route_request({**CHAT, "model": "emoji"}, ROUTES)["cache_salt"]
    other_prompt = {**CHAT, "model": "lofit+emoji", "messages": [{"role": "user", "content": "Hello!"}]}
    assert routed["cache_salt"] != route_request(other_prompt, ROUTES)["cache_salt"]  # "emoji" is at "l1"
    for bad in ("emoji+emoji", "emoji+nope", "emoji+", "base+emoji"):
        with pytest.raises(reftlib.InputError, match="does not exist"):
            route_request({**CHAT, "model": bad}, ROUTES)


def test_unknown_model_and_forged_adapter_argument_are_refused():
    with pytest.raises(reftlib.InputError, match=r"`nope` does not exist\. Served: base, base-alias, emoji, lofit"):
        route_request({**CHAT, "model": "nope"}, ROUTES)
    with pytest.raises(reftlib.InputError, match="model=NAME") as caught:
        route_request({**CHAT, "model": "base", "vllm_xargs": {ADAPTER_ARG: "emoji"}}, ROUTES)
    assert caught.value.status == 400


def test_parse_adapter_specs():
    assert parse_adapter_specs(["a=runs/a", " b = /x=y "]) == {"a": "runs/a", "b": "/x=y"}
    for bad in (["a"], ["=x"], ["a="]):
        with pytest.raises(reftlib.InputError, match="NAME=PATH"):
            parse_adapter_specs(bad)
    with pytest.raises(reftlib.InputError, match="given twice"):
        parse_adapter_specs(["a=x", "a=y"])
    with pytest.raises(reftlib.InputError, match="stacks adapters"):
        parse_adapter_specs(["a+b=x"])
    assert parse_adapter_specs(["a=f1+l1"], "--pyreft-positions", "emoji=f1+l1") == {"a": "f1+l1"}
    with pytest.raises(reftlib.InputError, match=r"--pyreft-positions 'a': write NAME=VALUE, e\.g\. "
                                                 r"--pyreft-positions emoji=f1\+l1"):
        parse_adapter_specs(["a"], "--pyreft-positions", "emoji=f1+l1")


# -- the ASGI middleware, with a stand-in for vLLM's app -----------------------------------------

class _FakeVllm:
    """Records the requests it gets; answers /v1/models with the base model's card."""

    def __init__(self):
        self.requests: list[tuple[str, dict, bytes]] = []

    async def __call__(self, scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.requests.append((scope["path"], dict(scope["headers"]), body))
        answer = {"object": "list", "data": [{"id": "base", "object": "model", "max_model_len": 256}]}
        payload = json.dumps(answer if scope["path"] == "/v1/models" else {"ok": True}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})


def _call(path: str, method: str = "POST", body: bytes = b"", chunks: int = 1):
    app = _FakeVllm()
    router = AdapterRouter(app)
    sent: list[dict] = []
    pieces = [body[len(body) * i // chunks: len(body) * (i + 1) // chunks] for i in range(chunks)]
    incoming = [{"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)]

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": path, "method": method,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    set_server_routes(ROUTES)
    try:
        asyncio.run(router(scope, receive, send))
    finally:
        set_server_routes(None)
    status = sent[0]["status"]
    answer = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    return app, status, answer


def test_router_rewrites_a_request_sent_in_pieces():
    app, status, _ = _call("/v1/chat/completions", body=json.dumps(CHAT).encode(), chunks=3)
    assert status == 200
    _, headers, body = app.requests[0]
    forwarded = json.loads(body)
    assert forwarded["model"] == "base" and forwarded["vllm_xargs"] == {ADAPTER_ARG: "emoji"}
    assert int(headers[b"content-length"]) == len(body)


def test_router_answers_refusals_in_openai_error_format():
    app, status, answer = _call("/v1/completions", body=json.dumps({"model": "nope", "prompt": "x"}).encode())
    assert status == 404 and not app.requests
    assert answer["error"]["type"] == "NotFoundError" and answer["error"]["code"] == 404
    assert "emoji" in answer["error"]["message"]


def test_router_lists_adapters_in_models():
    _, status, answer = _call("/v1/models", method="GET")
    assert status == 200
    cards = {card["id"]: card for card in answer["data"]}
    assert list(cards) == ["base", "emoji", "lofit"]
    assert cards["emoji"]["parent"] == "base" and cards["emoji"]["root"] == "/runs/emoji"
    assert cards["emoji"]["max_model_len"] == 256 and cards["emoji"]["owned_by"] == "reftlib"


def test_router_leaves_other_requests_to_vllm():
    app, _, _ = _call("/v1/completions", body=b"not json")
    assert app.requests[0][2] == b"not json"
    app, _, _ = _call("/tokenize", body=json.dumps({"model": "emoji", "prompt": "x"}).encode())
    assert json.loads(app.requests[0][2])["model"] == "emoji"


def test_serve_command_without_vllm_names_the_install(capsys):
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here; the refusal is checked where it is not")
    from reftlib.cli import main

    assert main(["serve", "some/model", "--adapter", "a=runs/a", "--port", "8000"]) == 2
    assert "pip install vllm" in capsys.readouterr().err
