"""Serving saved adapters on vLLM computes what reftlib's Hugging Face model computes.

Runs only where vLLM is installed (``make test-vllm`` builds ``.venv-vllm`` with the CPU build).
One engine serves every test (start-up takes about a minute). vLLM decodes greedily in float32;
the reference is reftlib's Hugging Face model with the same adapters in float64, fed vLLM's tokens
(teacher forcing through ``generate``, so positions such as "l1" stay relative to the prompt).

What is compared, and why not the tokens alone: two float32 engines order their reductions
differently (blocked GEMMs, fused attention), so at a near tie between two tokens greedy decoding
may pick either, and such ties are common in the strongly steered text these adapters produce.
So each step checks (1) vLLM's token is greedy under the float64 reference up to ``TOLERANCE``
nats, and (2) vLLM's log-probability of that token is within ``TOLERANCE`` of the reference's.
The tolerance is set by what the test must tell apart rather than by one machine's rounding:
every adapter row must move the log-probabilities of vLLM's tokens by at least
``SEPARATION * TOLERANCE`` nats from the base model's, so a row served without its adapter, or
with another row's, cannot pass. Failures name the row and the size of the difference.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
from helpers import randomize

vllm = pytest.importorskip("vllm")

import reftlib  # noqa: E402
from reftlib.serving import ReftLLM, cache_salt  # noqa: E402

pytestmark = pytest.mark.slow

MAX_NEW = 12
TOLERANCE = 1e-2  # nats; float32 rounding over 30 layers is orders of magnitude below this
SEPARATION = 10  # each adapter moves vLLM's tokens' log-probabilities by at least this many tolerances
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three colours.",
    "How do I boil an egg?",
]

LONG_REQUEST = (
    "A lighthouse keeper on a small northern island writes a letter every evening to his sister, who "
    "lives in a busy city far to the south. He describes the weather, the ships that pass, the birds "
    "that nest on the cliffs and the repairs he makes to the lamp. She answers once a month with news "
    "of the markets, the trains, her children and the theatre. After ten years the lighthouse is "
    "automated and he must leave the island. Write the first paragraph of the letter he sends on his "
    "last evening there, and say in one sentence how his sister might reply."
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """``(engine, tokenizer, prompts as token ids, float64 HF ReftModel with the same adapters)``."""
    from reftlib.offline import default_model_path, load_default_model

    model, tokenizer = load_default_model(dtype=torch.float32)
    reft_model = reftlib.get_reft_model(model, reftlib.ReftConfig(representations=[
        {"layer": 15, "component": "block_output", "low_rank_dimension": 4, "positions": "l1"},
    ]), set_device=False)
    reft_model.add_adapter("fl", reftlib.ReftConfig(representations=[
        {"layer": 4, "component": "block_output", "low_rank_dimension": 2, "positions": "f2+l2"},
        {"layer": 20, "component": "block_output", "low_rank_dimension": 2, "positions": "f2+l2"},
    ]))
    reft_model.add_adapter("lofit", reftlib.ReftConfig(representations=[
        {"layer": 3, "component": "head_output", "intervention": reftlib.HeadBiasIntervention(heads=[0, 2, 5]),
         "positions": None},
        {"layer": 12, "component": "head_output", "intervention": reftlib.HeadBiasIntervention(heads=[1]),
         "positions": None},
    ]))
    randomize(reft_model, scale=0.5)
    with torch.no_grad():  # strong LoFiT offsets, so the steered text differs from the base text
        for name, param in reft_model.adapters["lofit"].named_parameters():
            param.mul_(8.0 if name.endswith("bias") else 1.0)
    folder = tmp_path_factory.mktemp("adapters")
    reft_model.save_pretrained(folder)
    del reft_model, model
    reference = reftlib.ReftModel.from_pretrained(folder, load_default_model(dtype=torch.float64)[0])
    assert sorted(reference.adapters) == ["default", "fl", "lofit"]
    reference.eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                             add_generation_prompt=True, return_dict=False)
               for q in QUESTIONS]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    engine = ReftLLM(default_model_path(), adapters={"default": folder, "fl": folder, "lofit": folder},
                     dtype="float32", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=48, block_size=32,
                     seed=0)
    yield engine, tokenizer, prompts, reference
    # vLLM shuts its engine process down from an atexit hook that logs to streams pytest has closed
    # by then; those messages would print "--- Logging error ---" tracebacks after the summary.
    logging.raiseExceptions = False


class _ForceTokens:
    """A logits processor that makes ``generate`` emit ``tokens`` (teacher forcing with the KV cache)."""

    def __init__(self, prompt_length: int, tokens: list[int]):
        self.prompt_length, self.tokens = prompt_length, tokens

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.tokens[input_ids.shape[1] - self.prompt_length]] = 0.0
        return forced


def _reference_logprobs(reference, prompt: list[int], adapter: str | None, tokens: list[int]) -> torch.Tensor:
    """``(len(tokens), vocab)`` float64 log-probabilities of each step of ``generate`` fed ``tokens``."""
    from transformers import LogitsProcessorList

    ids = torch.tensor([prompt])
    out = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=[adapter],
                             max_new_tokens=len(tokens), min_new_tokens=len(tokens), do_sample=False,
                             logits_processor=LogitsProcessorList([_ForceTokens(len(prompt), tokens)]),
                             output_logits=True, return_dict_in_generate=True)
    return torch.log_softmax(torch.stack([step[0] for step in out.logits]).double(), dim=-1)


def _check_served(setup, rows: list[tuple[list[int], str | None]]) -> None:
    """Serve ``rows`` (prompt, adapter) as one batch and check every row against the reference."""
    engine, _, _, reference = setup
    params = vllm.SamplingParams(max_tokens=MAX_NEW, temperature=0.0, logprobs=1)
    outs = engine.generate([p for p, _ in rows], params, adapters=[a for _, a in rows])
    for row, ((prompt, adapter), out) in enumerate(zip(rows, outs)):
        tokens = list(out.outputs[0].token_ids)
        served = torch.tensor([step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens)],
                              dtype=torch.float64)
        steps, chosen = torch.arange(len(tokens)), torch.tensor(tokens)
        want = _reference_logprobs(reference, prompt, adapter, tokens)
        greedy_gap = (want.max(dim=-1).values - want[steps, chosen]).max().item()
        error = (served - want[steps, chosen]).abs().max().item()
        where = f"row {row} (adapter {adapter!r}, tokens {tokens})"
        assert greedy_gap <= TOLERANCE, f"{where}: a token {greedy_gap:.3g} nats below the greedy choice"
        assert error <= TOLERANCE, f"{where}: log-probabilities {error:.3g} nats from the reference"
        if adapter is not None:
            base = _reference_logprobs(reference, prompt, None, tokens)
            moved = (base[steps, chosen] - want[steps, chosen]).abs().max().item()
            assert moved >= SEPARATION * TOLERANCE, f"{where}: the adapter moves only {moved:.3g} nats"


def test_base_model_matches_hf(setup):
    prompts = setup[2]
    _check_served(setup, [(p, None) for p in prompts])


@pytest.mark.parametrize("adapter", ["default", "fl", "lofit"])
def test_adapter_matches_hf(setup, adapter):
    """LoReFT at "l1", LoReFT at "f2+l2" on two layers, LoFiT head offsets (every position)."""
    prompts = setup[2]
    _check_served(setup, [(p, adapter) for p in prompts])


def test_mixed_batch_matches_hf(setup):
    """Adapters and base rows share one continuous batch; each row gets its own adapter's tokens."""
    prompts = setup[2]
    _check_served(setup, [(prompts[0], "default"), (prompts[1], None), (prompts[2], "lofit"), (prompts[3], "fl"),
                          (prompts[0], None), (prompts[1], "lofit"), (prompts[2], "default"), (prompts[3], None)])


def test_chunked_prefill_and_prefix_cache(setup):
    """A prompt longer than the per-step token budget is prefilled in chunks, and its full KV blocks go
    to the prefix cache: each adapter still gets its own tokens ("l1" on the last prompt token, LoFiT on
    every token), run one after the other on the same prompt, the base model first. Without
    per-adapter cache salts the adapters would reuse the base model's cached blocks."""
    engine, tokenizer, _, _ = setup
    config = engine.llm.llm_engine.vllm_config
    budget = config.scheduler_config.max_num_batched_tokens
    long_prompt = tokenizer.apply_chat_template([{"role": "user", "content": LONG_REQUEST}], tokenize=True,
                                                add_generation_prompt=True, return_dict=False)
    long_prompt = list(long_prompt["input_ids"]) if isinstance(long_prompt, dict) else list(long_prompt)
    assert len(long_prompt) + MAX_NEW <= config.model_config.max_model_len
    assert len(long_prompt) > budget, "the prompt must not fit in one step"
    assert config.cache_config.enable_prefix_caching
    assert config.cache_config.block_size <= len(long_prompt) // 2, "the prompt must fill a cached block"
    for adapter in (None, "lofit", "fl", "default", None):
        _check_served(setup, [(long_prompt, adapter)])


def test_cache_salt_separates_adapters_and_prompt_lengths(setup):
    engine = setup[0]
    assert cache_salt(None, 10) is None
    assert cache_salt(engine.adapters["default"], 10) != cache_salt(engine.adapters["default"], 11)
    assert cache_salt(engine.adapters["lofit"], 10) == cache_salt(engine.adapters["lofit"], 11)
    assert cache_salt(engine.adapters["lofit"], 10) != cache_salt(engine.adapters["fl"], 10)


def test_unknown_adapter_is_refused(setup):
    engine = setup[0]
    with pytest.raises(reftlib.AdapterError, match="unknown adapter"):
        engine.generate(["hi"], adapters=["nope"])


def test_unservable_adapter_is_refused_before_the_engine_starts(tmp_path):
    from reftlib.offline import default_model_path, load_default_model

    model, _ = load_default_model(dtype=torch.float32)
    reftlib.get_reft_model(model, {"layer": 2, "component": "mlp_output", "low_rank_dimension": 2},
                           set_device=False).save_pretrained(tmp_path)
    with pytest.raises(reftlib.AdapterError, match="mlp_output"):
        ReftLLM(default_model_path(), adapters={"default": tmp_path}, dtype="float32")


def test_unsupported_vllm_version_is_refused():
    from reftlib.serving.vllm_backend import check_vllm_version

    assert check_vllm_version("0.32.3") == "0.32.3"
    with pytest.raises(reftlib.ReftError, match=r"vLLM 0\.31\.0 is not supported.*0\.32\.x"):
        check_vllm_version("0.31.0")


def test_settings_that_break_the_hooks_are_refused():
    from reftlib.offline import default_model_path

    with pytest.raises(reftlib.ReftError, match="enforce_eager"):
        ReftLLM(default_model_path(), enforce_eager=False)
    with pytest.raises(reftlib.ReftError, match="tensor_parallel_size=1"):
        ReftLLM(default_model_path(), tensor_parallel_size=2)


def test_other_architectures_are_refused(setup, tmp_path):
    from reftlib.serving.adapters import load_served_adapter

    folder = setup[0].adapters["default"].folder
    with pytest.raises(reftlib.AdapterError, match="'gpt2'"):
        load_served_adapter("default", folder, {"model_type": "gpt2", "num_hidden_layers": 30, "hidden_size": 576,
                                                "num_attention_heads": 9})
