"""Serving saved adapters on vLLM gives the tokens reftlib's Hugging Face ``generate`` gives.

Runs only where vLLM is installed (``make test-vllm`` builds ``.venv-vllm`` with the CPU build).
One engine serves every test (start-up takes about a minute). Both sides run the same float32
weights greedily; the reference is ``ReftModel.generate`` on the Hugging Face model. Tokens are
compared exactly: greedy decoding turns last-bit differences into different tokens only at a near
tie, and the base model's agreement (checked first) shows the prompts and lengths have none.
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
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Name three colours.",
    "How do I boil an egg?",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """``(engine, tokenizer, prompts as token ids, HF ReftModel with the same adapters, adapter folder)``."""
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
    reft_model.eval()
    folder = tmp_path_factory.mktemp("adapters")
    reft_model.save_pretrained(folder)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                             add_generation_prompt=True, return_dict=False)
               for q in QUESTIONS]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    engine = ReftLLM(default_model_path(), adapters={"default": folder, "fl": folder, "lofit": folder},
                     dtype="float32", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=48, block_size=32,
                     seed=0)
    yield engine, tokenizer, prompts, reft_model
    # vLLM shuts its engine process down from an atexit hook that logs to streams pytest has closed
    # by then; those messages would print "--- Logging error ---" tracebacks after the summary.
    logging.raiseExceptions = False


def _hf_tokens(reft_model, tokenizer, prompt: list[int], adapter: str | None) -> list[int]:
    """Greedy tokens of reftlib's Hugging Face ``generate`` (one unpadded row), cut after the first EOS."""
    ids = torch.tensor([prompt])
    out = reft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=[adapter],
                              max_new_tokens=MAX_NEW, do_sample=False)
    new = out[0, len(prompt):].tolist()
    eos = tokenizer.eos_token_id
    return new[: new.index(eos) + 1] if eos in new else new


def _vllm_tokens(engine, prompts, adapters) -> list[list[int]]:
    params = vllm.SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    outs = engine.generate(prompts, params, adapters=adapters)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_base_model_matches_hf(setup):
    engine, tokenizer, prompts, reft_model = setup
    got = _vllm_tokens(engine, prompts, [None] * len(prompts))
    assert got == [_hf_tokens(reft_model, tokenizer, p, None) for p in prompts]


@pytest.mark.parametrize("adapter", ["default", "fl", "lofit"])
def test_adapter_matches_hf(setup, adapter):
    """LoReFT at "l1", LoReFT at "f2+l2" on two layers, LoFiT head offsets (every position)."""
    engine, tokenizer, prompts, reft_model = setup
    got = _vllm_tokens(engine, prompts, [adapter] * len(prompts))
    want = [_hf_tokens(reft_model, tokenizer, p, adapter) for p in prompts]
    base = [_hf_tokens(reft_model, tokenizer, p, None) for p in prompts]
    assert want != base, "the adapter does not change the text; the test would prove nothing"
    assert got == want


def test_mixed_batch_matches_hf(setup):
    """Adapters and base rows share one continuous batch; each row gets its own adapter's tokens."""
    engine, tokenizer, prompts, reft_model = setup
    rows = [(prompts[0], "default"), (prompts[1], None), (prompts[2], "lofit"), (prompts[3], "fl"),
            (prompts[0], None), (prompts[1], "lofit"), (prompts[2], "default"), (prompts[3], None)]
    got = _vllm_tokens(engine, [p for p, _ in rows], [a for _, a in rows])
    assert got == [_hf_tokens(reft_model, tokenizer, p, a) for p, a in rows]


def test_chunked_prefill_and_prefix_cache(setup):
    """A prompt longer than the per-step token budget is prefilled in chunks, and its full KV blocks go
    to the prefix cache: each adapter still gets its own tokens ("l1" on the last prompt token, LoFiT on
    every token), run one after the other on the same prompt, the base model first. Without
    per-adapter cache salts the adapters would reuse the base model's cached blocks."""
    engine, tokenizer, prompts, reft_model = setup
    config = engine.llm.llm_engine.vllm_config
    budget = config.scheduler_config.max_num_batched_tokens
    long_prompt = (prompts[0] * ((240 // len(prompts[0])) + 1))[: 240 - MAX_NEW]
    assert len(long_prompt) > budget, "the prompt must not fit in one step"
    assert config.cache_config.enable_prefix_caching
    assert config.cache_config.block_size <= len(long_prompt) // 2, "the prompt must fill a cached block"
    for adapter in (None, "lofit", "fl", "default", None):
        want = _hf_tokens(reft_model, tokenizer, long_prompt, adapter)
        assert _vllm_tokens(engine, [long_prompt], [adapter]) == [want], adapter


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
