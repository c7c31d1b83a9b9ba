"""``reftlib serve``: vLLM's OpenAI-compatible server with adapters chosen by model name, on loopback.

Runs only where vLLM and the ``openai`` client are installed (``make test-vllm``). One server
process serves every test of this module (start-up takes about a minute). Answers are checked
against reftlib's Hugging Face model with the same adapters in float64 (``served_reference``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from served_reference import (
    ADAPTERS,
    LONG_REQUEST,
    MAX_NEW,
    QUESTIONS,
    assert_same_up_to_ties,
    chat_prompt,
    check_served,
    load_reference,
    save_test_adapters,
)

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

BASE = "smollm2"  # --served-model-name of the base model
STARTUP_SECONDS = 420


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "reftlib", "serve", *args]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``(client, tokenizer, reference, adapter folder, pyreft folder)`` for a running ``reftlib serve``.

    It serves the test adapters and ``pyreft``: ``default`` saved as pyreft saves it, with
    ``--pyreft-positions pyreft=l1``."""
    from transformers import AutoTokenizer

    from reftlib.offline import default_model_path

    folder = tmp_path_factory.mktemp("adapters")
    pyreft_folder = tmp_path_factory.mktemp("pyreft")
    save_test_adapters(folder, pyreft_copy=pyreft_folder)
    reference = load_reference(folder)
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    port = _free_port()
    log = open(tmp_path_factory.mktemp("server") / "server.log", "w+b")  # noqa: SIM115 (closed below)
    command = _serve_command(str(default_model_path()), *(f"--adapter={name}={folder}" for name in ADAPTERS),
                             f"--adapter=pyreft={pyreft_folder}", "--pyreft-positions", "pyreft=l1",
                             "--served-model-name", BASE, "--host", "127.0.0.1", "--port", str(port),
                             "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4",
                             "--max-num-batched-tokens", "48", "--block-size", "32", "--seed", "0",
                             "--enable-prefix-caching")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"reftlib serve exited with {process.returncode}:\n{log.read().decode()[-4000:]}")
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline:
                    pytest.fail(f"reftlib serve did not answer within {STARTUP_SECONDS} s")
                time.sleep(2)
        log.seek(0)
        started = log.read().decode(errors="replace")
        if "Resolved architecture: ReftlibLlamaForCausalLM" not in started:  # the compiled engine, hooks traced in
            pytest.fail(f"reftlib serve did not start reftlib's compiled model class:\n{started[-4000:]}")
        yield client, tokenizer, reference, folder, pyreft_folder
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


def _token_ids(logprobs) -> list[int]:
    """Token ids of a completion's logprobs under ``return_tokens_as_token_ids`` ("token_id:123")."""
    return [int(token.rsplit(":", 1)[1]) for token in logprobs]


def _complete(client, model: str, prompt: list[int]) -> tuple[list[int], list[float]]:
    """Greedy completion of token ids; returns the served tokens and their log-probabilities."""
    out = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_NEW, temperature=0.0, logprobs=1,
                                    extra_body={"return_tokens_as_token_ids": True})
    choice = out.choices[0]
    return _token_ids(choice.logprobs.tokens), list(choice.logprobs.token_logprobs)


def _adapter(model: str):
    """The reference's ``adapter_names`` entry for a served model name (``pyreft`` is ``default`` saved by pyreft)."""
    return None if model == BASE else model.split("+") if "+" in model else "default" if model == "pyreft" else model


def test_models_lists_base_and_adapters(server):
    client, _, _, folder, _ = server
    cards = {card.id: card for card in client.models.list().data}
    assert list(cards) == [BASE, *ADAPTERS, "pyreft"]
    for name in ADAPTERS:
        assert cards[name].parent == BASE
        assert cards[name].root.startswith(str(folder))
    assert cards["pyreft"].root == str(server[4])


@pytest.mark.parametrize("model", [BASE, *ADAPTERS, "lofit+default", "pyreft"])
def test_completions_select_the_adapter_by_name(server, model):
    client, tokenizer, reference, *_ = server
    for row, question in enumerate(QUESTIONS[:2]):
        prompt = chat_prompt(tokenizer, question)
        tokens, logprobs = _complete(client, model, prompt)
        check_served(reference, prompt, _adapter(model), tokens, logprobs, f"question {row}")


def _chat_tokens(choice_logprobs) -> tuple[list[int], list[float]]:
    content = choice_logprobs.content
    return _token_ids([item.token for item in content]), [item.logprob for item in content]


def test_chat_streaming_and_not(server):
    """Chat requests are templated by vLLM as reftlib's tokenizer does; streamed deltas add up to the answer."""
    client, tokenizer, reference, *_ = server
    messages = [{"role": "user", "content": QUESTIONS[2]}]
    prompt = chat_prompt(tokenizer, QUESTIONS[2])
    kwargs = dict(model="lofit", messages=messages, max_tokens=MAX_NEW, temperature=0.0, logprobs=True,
                  extra_body={"return_tokens_as_token_ids": True})
    whole = client.chat.completions.create(**kwargs).choices[0]
    tokens, logprobs = _chat_tokens(whole.logprobs)
    check_served(reference, prompt, "lofit", tokens, logprobs, "chat")

    text, streamed, streamed_logprobs = "", [], []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].logprobs is not None:
                streamed += [item.token for item in chunk.choices[0].logprobs.content]
                streamed_logprobs += [item.logprob for item in chunk.choices[0].logprobs.content]
    streamed_tokens = _token_ids(streamed)
    check_served(reference, prompt, "lofit", streamed_tokens, streamed_logprobs, "streamed chat")
    assert_same_up_to_ties(reference, prompt, "lofit", tokens, streamed_tokens, "streamed vs whole")
    if streamed_tokens == tokens:
        assert text == whole.message.content


def test_unknown_model_is_a_404_naming_the_served_ones(server):
    client = server[0]
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="nope", prompt="Hi", max_tokens=2)
    message = str(caught.value)
    assert "`nope` does not exist" in message
    for name in (BASE, *ADAPTERS):
        assert name in message


def test_adapter_argument_from_the_client_is_refused(server):
    client = server[0]
    with pytest.raises(openai.BadRequestError, match="model=NAME"):
        client.completions.create(model=BASE, prompt="Hi", max_tokens=2,
                                  extra_body={"vllm_xargs": {"reftlib_adapter": "lofit"}})


def test_concurrent_requests_answer_as_one_by_one(server):
    """Eight requests with different adapters at once share the engine's batches; each gets its answer."""
    client, tokenizer, reference, *_ = server
    rows = [(chat_prompt(tokenizer, QUESTIONS[i % 4]), model)
            for i, model in enumerate([BASE, "default", "lofit", "fl", "lofit", BASE, "fl", "default"])]
    one_by_one = [_complete(client, model, prompt) for prompt, model in rows]
    with ThreadPoolExecutor(len(rows)) as pool:
        at_once = list(pool.map(lambda row: _complete(client, row[1], row[0]), rows))
    for row, ((prompt, model), (alone, _), (together, logprobs)) in enumerate(zip(rows, one_by_one, at_once)):
        check_served(reference, prompt, _adapter(model), together, logprobs, f"concurrent row {row}")
        assert_same_up_to_ties(reference, prompt, _adapter(model), alone, together, f"row {row}")


def test_prefix_cache_rule(server):
    """A prompt of exactly three KV blocks, then a longer one starting with it, under the base model,
    "l1" LoReFT and LoFiT, with prefix caching on.

    The longer prompt finds the shorter one's three cached blocks. Under LoFiT (every position: a
    token's edit depends on its prefix only) reusing them is right; under "l1" it would be wrong
    (the shorter prompt's last token, in the third block, was edited; in the longer prompt it is
    not), so the server salts those blocks apart. Each answer must be its own adapter's.
    """
    client, tokenizer, reference, *_ = server
    longer = chat_prompt(tokenizer, LONG_REQUEST)
    short = longer[:96]  # block size 32: three full blocks, the last one holding the "l1" token
    assert len(longer) >= len(short) + 16
    for model in (BASE, "default", "lofit"):
        for prompt in (short, longer):
            tokens, logprobs = _complete(client, model, prompt)
            check_served(reference, prompt, _adapter(model), tokens, logprobs, f"{model}, {len(prompt)} tokens")


def test_adapters_that_cannot_be_served_are_refused_at_startup(server, tmp_path):
    import torch

    import reftlib
    from reftlib.offline import default_model_path, load_default_model

    folder, pyreft_folder = server[3], server[4]
    model, _ = load_default_model(dtype=torch.float32)
    reftlib.get_reft_model(model, {"layer": 2, "component": "mlp_output", "low_rank_dimension": 2},
                           set_device=False).save_pretrained(tmp_path / "mlp")
    cases = [
        (["--adapter", f"x={tmp_path / 'missing'}"], "missing"),
        (["--adapter", f"x={tmp_path / 'mlp'}"], "mlp_output"),
        (["--adapter", "no-path"], "NAME=PATH"),
        (["--adapter", f"{BASE}={folder / 'lofit'}", "--served-model-name", BASE], "served name"),
        (["--adapter", f"lofit={folder}", "--tensor-parallel-size", "2"], "tensor-parallel-size 1"),
        (["--adapter", f"x={pyreft_folder}"], "--pyreft-positions x=f1+l1"),
        (["--adapter", f"x={pyreft_folder}", "--pyreft-positions", "y=l1"], "not among the adapters"),
        (["--adapter", f"x={pyreft_folder}", "--pyreft-positions", "x=q1"], "pyreft positions 'q1'"),
    ]
    for args, expected in cases:
        done = subprocess.run(_serve_command(str(default_model_path()), *args), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 2, (args, done.stdout[-2000:], done.stderr[-2000:])
        assert expected in done.stderr, (args, done.stderr[-2000:])
